"""Stage evaluate: zero-shot clean and robust accuracy of each encoder under each attack on every zero-shot
dataset. Each (dataset, encoder, attack) result is a cache entry of its own, so a warm run evaluates nothing;
what is missing runs as Ray tasks, submitted at once (start) and collected later (finish), so the original
teacher's evaluation can run beside the fine-tune."""

from __future__ import annotations

import json
from dataclasses import dataclass

import ray

from agft_core.attacks import AUTOATTACK_MIN_CLASSES
from agft_core.cache import CacheEntry, describe_file, embeddings_of, join, read_bytes, read_parquet, write_bytes
from pipeline.cluster import alive_nodes, room_beside_training
from pipeline.config.sections import ConfigError
from pipeline.context import Prepared, RunContext
from pipeline.remote import get, wait
from tasks.describe import file_digest
from tasks.evaluate import evaluate_zero_shot

RESULT_FILE = "result.json"
VERSION = 2  # changes when the same cell would score differently


@dataclass
class Pending:
    """An evaluation under way: its cells' caches and the Ray tasks computing the missing ones."""

    label: str
    cells: dict[tuple, CacheEntry]  # (dataset key, encoder name, attack) -> its cache entry
    key_of: dict[str, str]  # dataset name -> dataset key
    refs: list


def attack_of(row: dict) -> tuple:
    """The (attack, ε, α, steps, restarts) an eval result row was computed under."""
    return row["attack"], row["eps"], row["alpha"], row["steps"], row["restarts"]


def evaluate(
    ctx: RunContext, prepared: Prepared, encoders: dict[str, str | None], attacks: list[tuple], per_cell: bool = False
) -> list[dict]:
    """Zero-shot accuracy of each encoder (None: the teacher, else a weights file) under each (attack, ε, α,
    steps, restarts) on every zero-shot dataset: one row per (dataset, encoder, attack)."""
    return finish(ctx, start(ctx, prepared, encoders, attacks, per_cell))


def start(
    ctx: RunContext, prepared: Prepared, encoders: dict[str, str | None], attacks: list[tuple], per_cell: bool = False
) -> Pending:
    """Submits the evaluation and returns at once. Each result is keyed by the encoder's content, the dataset,
    its class-prompt embeddings and the attack. What is missing runs as one Ray task per dataset, or with
    per_cell one per (dataset, encoder, attack)."""
    cfg = ctx.cfg
    files = {name: weights for name, weights in encoders.items() if weights is not None}
    digest_task = file_digest.options(**ctx.cpu_options())
    computed = get([digest_task.remote(w) for w in files.values()], "eval.matrix.checkpoints")
    digests = {name: prepared.teacher.digest for name in encoders} | dict(zip(files, computed))
    cells = {}
    zero_shot = [key for key in prepared.specs if key.startswith("zs")]
    for key in zero_shot:
        for name in encoders:
            for attack in attacks:
                cells[key, name, attack] = CacheEntry(
                    ctx.cache_root,
                    "eval",
                    {
                        "recipe": VERSION,  # the key's name predates "version": renaming it would orphan every result
                        "arch": cfg.model.arch,
                        "encoder": digests[name],
                        "dataset": prepared.infos[key].identity,
                        "text": prepared.texts[key].fingerprint,
                        "attack": list(attack),
                        "batch_size": cfg.eval.batch_size,
                        "seed": cfg.seed,
                    },
                )
    missing = [cell for cell, entry in cells.items() if "eval" in ctx.rerun or entry.problem(1) is not None]
    ctx.hits[f"eval {', '.join(encoders)}"] = not missing
    ctx.log(
        f"[eval {', '.join(encoders)}] {len(cells) - len(missing)} of {len(cells)} results cached"
        + (f", computing {len(missing)}" if missing else ", skipping")
    )
    task = evaluate_zero_shot.options(**ctx.task_options())
    refs = []
    for key in dict.fromkeys(key for key, _, _ in missing):
        names = list(dict.fromkeys(n for k, n, _ in missing if k == key))
        todo = list(dict.fromkeys(a for k, _, a in missing if k == key))
        if per_cell:
            groups = [({n: encoders[n]}, [a]) for n in names for a in todo if (key, n, a) in missing]
        else:
            groups = [({n: encoders[n] for n in names}, todo)]
        text = ray.put(embeddings_of(read_parquet(prepared.texts[key].files())))
        refs += [
            task.remote(
                prepared.teacher.source,
                prepared.specs[key],
                encoders=group,
                text_emb=text,
                attacks=group_attacks,
                batch_size=cfg.eval.batch_size,
                seed=cfg.seed,
                loader_workers=cfg.resources.loader_workers,
            )
            for group, group_attacks in groups
        ]
    return Pending(", ".join(encoders), cells, {prepared.specs[key].name: key for key in zero_shot}, refs)


def finish(ctx: RunContext, pending: Pending) -> list[dict]:
    """Waits for a start(), caches what it computed and returns every row, cached or not."""
    outputs = wait(pending.refs, f"zero-shot eval ({pending.label})")
    ctx.task_bars({f"eval {out['dataset']} ({pending.label})": out for out in outputs})
    computed = [row for out in outputs for row in out["rows"]]
    by_cell = {(pending.key_of[r["dataset"]], r["model"], attack_of(r)): r for r in computed}
    for cell, row in by_cell.items():
        entry = pending.cells[cell]
        with entry.attempt() as attempt:
            result = {k: v for k, v in row.items() if k != "model"}
            write_bytes(join(attempt, RESULT_FILE), json.dumps(result).encode())
            entry.commit(attempt, [describe_file(join(attempt, RESULT_FILE), rows=1)])
    rows = [
        by_cell.get(cell) or {**json.loads(read_bytes(entry.file_named(RESULT_FILE))), "model": cell[1]}
        for cell, entry in pending.cells.items()
    ]
    return [row | {"robust": row[ctx.cfg.eval.robust]} for row in rows]


def room_beside(ctx: RunContext) -> bool:
    """Whether the cluster holds the trainer and an eval task at once (room_beside_training). Only then does
    the original's evaluation run while the fine-tune trains: on a smaller cluster it would delay the
    trainer's start (and use up train.start_timeout_s) for no gain."""
    return room_beside_training(ctx.cfg, alive_nodes())


def few_classes_note(prepared: Prepared, field: str, attacks: list[str]) -> str:
    """AutoAttack on zero-shot datasets with too few classes for its targeted DLR loss: refused for
    autoattack-rand; for autoattack, the caption's note that it ran there without APGD-T."""
    few = [
        info.name
        for key, info in prepared.infos.items()
        if key.startswith("zs") and len(info.classnames) < AUTOATTACK_MIN_CLASSES
    ]
    if few and "autoattack-rand" in attacks:
        raise ConfigError(
            f"{field}: autoattack-rand needs the DLR loss, hence at least {AUTOATTACK_MIN_CLASSES} "
            f"classes; {', '.join(few)} have fewer (use autoattack, apgd-ce, pgd or cw)"
        )
    if few and "autoattack" in attacks:
        return (
            f"; AutoAttack on {', '.join(few)} (under {AUTOATTACK_MIN_CLASSES} classes): APGD-CE, FAB-T and "
            f"Square, without APGD-T"
        )
    return ""
