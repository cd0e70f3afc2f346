"""Stage evaluate: zero-shot clean and robust accuracy of each encoder under each attack on every zero-shot
dataset.

Each (dataset, encoder, attack) cell is split into shards of eval.shard_size images. A shard is one Ray task,
and it writes its own cache entry the moment it is scored, so a warm run evaluates nothing and a rerun after a
crash, a kill or a preemption computes only the shards that are missing. All the missing shards are submitted at
once, the costliest first, so they fill every task slot (start), and are collected later (finish), so the
original teacher's evaluation can run beside the fine-tune. A failed shard is retried (eval.retries), then
reported in one line; the other shards go on and its cell is marked incomplete."""

from __future__ import annotations

import json
from dataclasses import dataclass

import ray

from agft_core.attacks import AUTOATTACK_MIN_CLASSES, forward_passes
from agft_core.cache import CacheEntry, embeddings_of, read_bytes, read_parquet
from agft_core.errors import InputError, first_line
from agft_core.subsets import image_ranges
from pipeline.cluster import alive_nodes, room_beside_training
from pipeline.config.sections import ConfigError
from pipeline.context import Prepared, RunContext
from pipeline.remote import get, settle
from tasks.describe import file_digest
from tasks.evaluate import RESULT_FILE, evaluate_shard

VERSION = 3  # changes when the same cell would score differently; 3: a result per shard of images, as counts
INCOMPLETE = "incomplete"  # what a table shows for a cell with a shard that failed
COUNTS = ("clean", "attacked", "clean_and_attacked")
# what a shard's task retries (a CUDA or NCCL error, a file system's hiccup) beside a process that died, which
# Ray retries anyway; never the InputError of a corrupt image, which would fail again
TRANSIENT = [RuntimeError, OSError]


class IncompleteEvaluation(RuntimeError):
    """Cells that a failed shard left incomplete, where a command cannot go on without them (`agft compare`)."""


@dataclass(frozen=True)
class Shard:
    """Images [start, stop) of one cell: a dataset (its key in Prepared.specs), an encoder and an attack."""

    dataset: str
    encoder: str
    attack: tuple
    images: tuple[int, int]

    @property
    def cell(self) -> tuple:
        return self.dataset, self.encoder, self.attack

    @property
    def cost(self) -> int:
        """Forward passes, at most: what orders the shards, costliest first."""
        name, _, _, steps, restarts = self.attack
        return (self.images[1] - self.images[0]) * forward_passes(name, steps, restarts or 1)


@dataclass
class Pending:
    """An evaluation under way: every shard's cache entry, and the Ray tasks computing the missing ones."""

    label: str
    entries: dict[Shard, CacheEntry]
    names: dict[str, str]  # dataset key -> dataset name
    refs: dict  # ObjectRef -> the Shard it scores


def attack_of(row: dict) -> tuple:
    """The (attack, ε, α, steps, restarts) an eval result row was computed under."""
    return row["attack"], row["eps"], row["alpha"], row["steps"], row["restarts"]


def evaluate(ctx: RunContext, prepared: Prepared, encoders: dict[str, str | None], attacks: list[tuple]) -> list[dict]:
    """Zero-shot accuracy of each encoder (None: the teacher, else a weights file) under each (attack, ε, α,
    steps, restarts) on every zero-shot dataset: one row per (dataset, encoder, attack)."""
    return finish(ctx, start(ctx, prepared, encoders, attacks))


def start(ctx: RunContext, prepared: Prepared, encoders: dict[str, str | None], attacks: list[tuple]) -> Pending:
    """Submits the missing shards and returns at once. Each shard is keyed by the encoder's content, the dataset,
    its images, its class-prompt embeddings and the attack."""
    cfg = ctx.cfg
    files = {name: weights for name, weights in encoders.items() if weights is not None}
    digest_task = file_digest.options(**ctx.cpu_options())
    computed = get([digest_task.remote(w) for w in files.values()], "eval.matrix.checkpoints")
    digests = {name: prepared.teacher.digest for name in encoders} | dict(zip(files, computed))
    zero_shot = [key for key in prepared.specs if key.startswith("zs")]
    entries = {}
    for key in zero_shot:
        for name in encoders:
            for attack in attacks:
                for images in image_ranges(prepared.infos[key].size, cfg.eval.shard_size):
                    entries[Shard(key, name, attack, images)] = CacheEntry(
                        ctx.cache_root,
                        "eval",
                        {
                            "recipe": VERSION,  # the key's name predates "version": renaming it would orphan results
                            "arch": cfg.model.arch,
                            "encoder": digests[name],
                            "dataset": prepared.infos[key].identity,
                            "images": list(images),
                            "text": prepared.texts[key].fingerprint,
                            "attack": list(attack),
                            "batch_size": cfg.eval.batch_size,
                            "seed": cfg.seed,
                        }
                        # every result cached before eval.precision was computed in fp32: their keys stay valid
                        | ({"precision": cfg.eval.precision} if cfg.eval.precision != "fp32" else {}),
                    )
    missing = [shard for shard, entry in entries.items() if "eval" in ctx.rerun or entry.problem(1) is not None]
    ctx.hits[f"eval {', '.join(encoders)}"] = not missing
    ctx.log(
        f"[eval {', '.join(encoders)}] {len(entries) - len(missing)} of {len(entries)} shards cached"
        + (f", computing {len(missing)}" if missing else ", skipping")
    )
    texts = {
        key: ray.put(embeddings_of(read_parquet(prepared.texts[key].files())))
        for key in dict.fromkeys(shard.dataset for shard in missing)
    }
    task = evaluate_shard.options(**ctx.task_options(), max_retries=cfg.eval.retries, retry_exceptions=TRANSIENT)
    refs = {}
    for shard in sorted(missing, key=lambda s: s.cost, reverse=True):  # Ray starts them in this order
        ref = task.remote(
            prepared.teacher.source,
            prepared.specs[shard.dataset],
            encoder_weights=encoders[shard.encoder],
            text_emb=texts[shard.dataset],
            attack=shard.attack,
            images=shard.images,
            batch_size=cfg.eval.batch_size,
            precision=cfg.eval.precision,
            seed=cfg.seed,
            loader_workers=cfg.resources.loader_processes(cfg.resources.task_cpus),
            out=entries[shard],
        )
        refs[ref] = shard
    names = {key: prepared.specs[key].name for key in zero_shot}
    return Pending(", ".join(encoders), entries, names, refs)


def finish(ctx: RunContext, pending: Pending) -> list[dict]:
    """Waits for a start() and returns every cell's row, its shards' counts added up. A shard that failed after
    its retries is said in one line (and kept in ctx.failures) and its cell's accuracies read INCOMPLETE; a
    shard that failed on bad input is raised as a ConfigError once the others are done."""
    outputs, errors = settle(list(pending.refs), f"zero-shot eval ({pending.label})")
    ctx.task_bars({_bar(pending, pending.refs[ref]): out for ref, out in outputs.items()})
    counts = {pending.refs[ref]: out["counts"] for ref, out in outputs.items()}
    failed = {pending.refs[ref]: error for ref, error in errors.items()}
    bad_input = [error for error in failed.values() if isinstance(error, InputError)]
    if bad_input:
        raise ConfigError(f"data.zero_shot: {bad_input[0]}")
    for shard, error in failed.items():
        line = f"[eval] {_bar(pending, shard)} failed after {ctx.cfg.eval.retries} retries: {first_line(error)[:200]}"
        ctx.failures.append(line)
        ctx.log(line)
    cells: dict[tuple, list[Shard]] = {}
    for shard in pending.entries:
        cells.setdefault(shard.cell, []).append(shard)
    return [_row(ctx, pending, cell, shards, counts, failed) for cell, shards in cells.items()]


def _row(ctx: RunContext, pending: Pending, cell: tuple, shards: list[Shard], counts: dict, failed: dict) -> dict:
    key, encoder, attack = cell
    name, eps, alpha, steps, restarts = attack
    row = {"model": encoder, "dataset": pending.names[key], "attack": name, "eps": eps, "alpha": alpha}
    row |= {"steps": steps, "restarts": restarts}
    if any(s in failed for s in shards):
        done = len(shards) - sum(s in failed for s in shards)
        return row | dict.fromkeys((*COUNTS, "robust"), INCOMPLETE) | {"n": f"{done}/{len(shards)} shards"}
    scored = [counts.get(s) or json.loads(read_bytes(pending.entries[s].file_named(RESULT_FILE))) for s in shards]
    n = sum(c["n"] for c in scored)
    row |= {kind: sum(c[kind] for c in scored) / n for kind in COUNTS} | {"n": n}
    return row | {"robust": row[ctx.cfg.eval.robust]}


def _bar(pending: Pending, shard: Shard) -> str:
    """A shard's name on the timeline and in its failure line: `agft eval` runs one attack at several ε."""
    (start, stop), (attack, eps) = shard.images, shard.attack[:2]
    return f"eval {pending.names[shard.dataset]} [{start}:{stop}] ({shard.encoder}, {attack}, ε {eps * 255:g}/255)"


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
