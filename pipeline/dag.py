"""The AGFT DAG on Ray Core: pretrain* → describe → (teacher cache ∥ text caches) → train → eval → report,
with the original teacher's eval beside the fine-tune where the cluster has room for both.

Steps run in dependency order; the tasks inside a step run in parallel and hand their
results on as ObjectRefs. Every step whose output is content-addressed (eval results
included) checks its cache first, says whether it hit, and rebuilds anything stale or
corrupt. Each step and each eval task is a bar on the run's timeline (timeline.png in MLflow).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from agft_core import world
from agft_core.attacks import AUTOATTACK_MIN_CLASSES
from agft_core.cache import (
    CacheEntry,
    absolute,
    describe_file,
    embeddings_of,
    filesystem,
    fingerprint,
    join,
    local_path,
    read_bytes,
    read_parquet,
    upload,
    write_bytes,
)
from agft_core.calibration import Calibration
from agft_core.catalog import DatasetSpec, attack_key, is_uri
from agft_core.datasets import DatasetInfo
from agft_core.errors import InputError
from agft_core.model import input_size
from agft_core.pretrain import RECIPE
from pipeline import registry, report, tracking
from pipeline.config import ROBUST_MEANING, Config, ConfigError, dump_yaml, preflight
from pipeline.train import (
    ENCODER_FILE,
    FINETUNE_RECIPE,
    HISTORY_FILE,
    TrainInputs,
    fit,
    read_history,
    resolved,
    room_beside_training,
)
from tasks import steps

EVAL_FILE = "result.json"
EVAL_RECIPE = 2  # part of every eval result's fingerprint: changes when the same cell would score differently
CHECK_SHARD = 5000  # images per Ray task of the decode check


@dataclass
class _Eval:
    """An evaluation under way: its cells' caches and the Ray tasks computing the missing ones."""

    label: str
    cells: dict[tuple, CacheEntry]  # (dataset key, encoder name, attack) -> its cache entry
    key_of: dict[str, str]  # dataset name -> dataset key
    refs: list


@dataclass(frozen=True)
class Teacher:
    """The model every step starts from: its weights (None: a random init), their content digest and the
    preprocessing its image tower expects."""

    weights: str | None
    digest: str
    preprocess: dict

    @property
    def size(self) -> int:
        return self.preprocess["size"][0]


@dataclass(frozen=True)
class Prepared:
    """What the steps before training and evaluation hand on. Datasets are keyed "zs<i>:<name>" (zero-shot)
    and, when training, "train" and "val"; each has its spec, its info and its class-prompt cache."""

    teacher: Teacher
    specs: dict[str, DatasetSpec]
    infos: dict[str, DatasetInfo]
    texts: dict[str, CacheEntry]
    teacher_cache: CacheEntry | None = None  # the frozen teacher's embeddings of data.train, when training
    calibration: Calibration | None = None  # γ fitted on the teacher cache, for calibration.gamma: auto


@dataclass
class _Build:
    """A cache step under way: for each entry it builds, the attempt folder and the Ray tasks filling it."""

    step: str
    config_field: str | None  # where a task's bad input is reported
    jobs: list[tuple[CacheEntry, str, dict]]  # (entry, attempt, {ref of a task writing a file: the task's name})
    start: float  # time.time() before its caches were checked


@dataclass
class RunResult:
    run_id: str
    rows: list[dict]
    cache_hits: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    datasets: list[dict] = field(default_factory=list)  # its MLflow dataset inputs (dataset_inputs)


def _get(refs, field: str | None = None):
    """ray.get, with a task's InputError (bad data or weights) raised as a ConfigError naming `field`:
    one line, no traceback. Ray does not retry a task that raised, so a corrupt image is reported once."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if not isinstance(cause, InputError):
            raise
        if field is None or isinstance(cause, ConfigError):  # a ConfigError already names its field
            raise cause from None
        raise ConfigError(f"{field}: {cause}") from None


def _field(key: str) -> str:
    """The config field of a dataset key of Pipeline.specs."""
    if key.startswith("zs"):
        return f"data.zero_shot.{key[2:].split(':')[0]}"
    return {"train": "data.train", "val": "train.validation.dataset"}[key]


class _LineProgress:
    """What a log file gets instead of a bar: a plain line at every 10 % and at least every 30 s, never
    a carriage return (which `ray job logs` and CI logs would show as one endless line); nothing for work
    done within QUIET_S."""

    QUIET_S = 10

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = self.last = time.monotonic()
        self.shown_tenths = 0

    def update(self, n: int) -> None:
        self.done += n
        tenths = 10 * self.done // self.total
        if time.monotonic() - self.start < self.QUIET_S:
            return
        if tenths > self.shown_tenths or time.monotonic() - self.last >= 30:
            self.shown_tenths, self.last = tenths, time.monotonic()
            print(
                f"{self.label}: {self.done}/{self.total} tasks ({100 * self.done // self.total} %, "
                f"{self.last - self.start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _wait(refs: list, label: str, field: str | None | dict = None) -> list:
    """ray.get with progress over task completions: a bar on a terminal, plain lines in a log. field: the
    config field a task's bad input is reported under, one for all or by ref."""
    if not refs:
        return []
    pending = list(refs)
    progress = (
        tqdm(total=len(refs), desc=label, unit="task", leave=False)
        if sys.stderr.isatty()
        else _LineProgress(len(refs), label)
    )
    results = {}
    with progress:
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ref] = _get(ref, field.get(ref) if isinstance(field, dict) else field)
            except BaseException:  # the first failure ends the step: its sibling tasks are cancelled
                for sibling in pending:
                    ray.cancel(sibling)
                raise
            progress.update(1)
    return [results[ref] for ref in refs]


def _accuracy_tags(rows: list[dict], model: str) -> dict[str, str]:
    """{"clean/<dataset>": "0.8123", "robust/<dataset>": ...} of one model ("original" or "finetuned") in
    accuracy_rows' rows."""
    return {
        f"{column.removeprefix(model + '_')}/{row['dataset']}": f"{value:.4f}"
        for row in rows
        for column, value in row.items()
        if column.startswith(model + "_")
    }


def dataset_inputs(prepared: Prepared) -> list[dict]:
    """The datasets a run reads, as tracking.log_datasets takes them. The digest is of what identifies their
    content (the generated pixels, or a root's path and file listing), not of the preprocessing, so runs of two
    models on the same data share it."""
    inputs = []
    for key, spec in prepared.specs.items():
        info = prepared.infos[key]
        if spec.kind == "embedded":
            source_type, source = (
                "code",
                {
                    "tags": {
                        "generator": "agft_core.world",
                        "world": world.fingerprint(),
                        "world_seed": str(spec.world_seed),
                        "split": spec.split,
                    }
                },
            )
        else:
            uri = spec.root if is_uri(spec.root) else Path(absolute(spec.root)).as_uri()
            scheme = uri.split("://", 1)[0]
            source_type, source = "local" if scheme == "file" else scheme, {"uri": uri, "split": spec.split}
            if "limit" in info.identity:  # which subset: the UI shows it beside the digest that covers it
                source |= {k: info.identity[k] for k in ("limit", "subset_seed", "stratified")}
        inputs.append(
            {
                "name": info.name,
                "digest": fingerprint({k: v for k, v in info.identity.items() if k != "size"}),
                "source_type": source_type,
                "source": source,
                "context": {"train": "training", "val": "validation"}.get(key, "evaluation"),
            }
        )
    return inputs


def _attack_of(row: dict) -> tuple:
    """The (attack, ε, α, steps, restarts) an eval result row was computed under."""
    return row["attack"], row["eps"], row["alpha"], row["steps"], row["restarts"]


def pretrain_key(cfg: Config) -> dict:
    """What the embedded teacher is a function of: every pretrain field, the model, the world and the recipe."""
    return {
        "arch": cfg.model.arch,
        "recipe": RECIPE,
        "world": world.fingerprint(),
        "world_seed": cfg.data.world_seed,
        "pretrain": cfg.pretrain.model_dump(),
    }


def check_inputs(cfg: Config) -> None:
    """preflight() where the data and weights are - a Ray task - not in the driver, which under
    `ray job submit` runs on the head, with neither mounted."""
    _get(ray.remote(preflight).options(num_cpus=cfg.resources.task_cpus).remote(cfg))


class Pipeline:
    def __init__(
        self, cfg: Config, tracking_uri: str, rerun: set[str] = frozenset(), log: Callable[[str], None] = print
    ):
        self.cfg, self.uri, self.rerun, self.log = cfg, tracking_uri, rerun, log
        self.root = absolute(cfg.cache_dir)
        self.checkpoints = self.storage("ray_train")
        self.hits: dict[str, bool] = {}
        self.seconds: dict[str, float] = {}
        self.t0 = time.time()
        self.timeline: list[dict] = []  # one bar per step and per eval task: start, end (s), cached, node
        self.checked: list[tuple[CacheEntry, int]] = []  # datasets found whole, not yet remembered (check_images)

    def storage(self, default_folder: str) -> str:
        """Where Ray Train/Tune keep their runs: storage_path, else a folder of the cache root."""
        return absolute(self.cfg.storage_path) if self.cfg.storage_path else join(self.root, default_folder)

    def _cached(self, step: str, entry: CacheEntry, label: str = "", expected_rows: int | None = None) -> bool:
        problem = "rerun requested" if step in self.rerun else entry.problem(expected_rows)
        hit = problem is None
        name = f"{step} {label}".strip()
        self.hits[name] = hit
        where = f"{entry.kind}/{entry.fingerprint}"
        self.log(f"[{name}] cached, skipping ({where})" if hit else f"[{name}] building: {problem} -> {where}")
        return hit

    # -- pretrain (embedded default only) ---------------------------------------------------
    def teacher_weights(self) -> str | None:
        model = self.cfg.model
        if model.weights == "random":
            return None
        if model.weights != "embedded":
            return model.weights
        entry = CacheEntry(self.root, "pretrain", pretrain_key(self.cfg))
        if not self._cached("pretrain", entry):
            with entry.attempt() as attempt:
                files = _get(
                    steps.pretrain_teacher.options(num_cpus=self._cpus()).remote(
                        model.arch, self.cfg.data.world_seed, out_dir=attempt, **self.cfg.pretrain.model_dump()
                    )
                )
                entry.commit(attempt, files)
        return entry.files()[0]

    def _task_resources(self) -> dict[str, float]:
        return {"num_cpus": self.cfg.resources.task_cpus, "num_gpus": self.cfg.resources.task_gpus}

    @staticmethod
    def _cpus() -> int:
        """All the CPUs of the biggest node: pretraining is one process and cannot span nodes."""
        per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
        return max(1, int(min(max(per_node, default=1), ray.available_resources().get("CPU", 1))))

    # -- text cache: one Parquet per dataset ---------------------------------------------------
    def start_text(self, teacher: Teacher, specs: dict, infos: dict, stack: ExitStack) -> tuple[dict, _Build]:
        """The class-prompt caches of every dataset, and the build of those missing (attempts on `stack`)."""
        start, entries, pending = time.time(), {}, {}
        for key, info in infos.items():
            entry = CacheEntry(
                self.root,
                "text",
                {
                    "weights": teacher.digest,
                    "arch": self.cfg.model.arch,
                    "dataset": info.name,
                    "classnames": info.classnames,
                    "templates": info.templates,
                },
            )
            seen = any(e.fingerprint == entry.fingerprint for e in entries.values())  # one task, two splits
            entries[key] = entry
            label = info.name if key.startswith("zs") else f"{info.name} ({key})"
            if not seen and not self._cached("text", entry, label, len(info.classnames)):
                pending[entry.fingerprint] = (entry, specs[key], label)
        task = steps.embed_class_prompts.options(**self._task_resources())
        jobs = []
        for entry, spec, label in pending.values():
            attempt = stack.enter_context(entry.attempt())
            ref = task.remote(
                self.cfg.model.arch, teacher.weights, spec, teacher.size, join(attempt, "part-00000.parquet")
            )
            jobs.append((entry, attempt, {ref: f"text {label}"}))
        return entries, _Build("text", None, jobs, start)

    # -- teacher cache: sharded Parquet of the frozen teacher's image embeddings -----------
    def start_teacher_cache(
        self, teacher: Teacher, spec: DatasetSpec, info: DatasetInfo, stack: ExitStack
    ) -> tuple[CacheEntry, _Build]:
        entry = CacheEntry(
            self.root,
            "teacher",
            {"weights": teacher.digest, "dataset": info.identity, "preprocess": teacher.preprocess},
        )
        start, n, jobs = time.time(), info.size, []
        if not self._cached("teacher", entry, info.name, n):
            shards = self.cfg.teacher_cache_shards
            bounds = [(n * i // shards, n * (i + 1) // shards) for i in range(shards)]
            task = steps.teacher_shard.options(**self._task_resources())
            attempt = stack.enter_context(entry.attempt())
            jobs.append(
                (
                    entry,
                    attempt,
                    {
                        task.remote(
                            self.cfg.model.arch,
                            teacher.weights,
                            spec,
                            teacher.size,
                            a,
                            b,
                            self.cfg.eval.batch_size,
                            self.cfg.resources.loader_workers,
                            join(attempt, f"part-{i:05d}.parquet"),
                        ): f"teacher shard {i + 1}/{shards}"
                        for i, (a, b) in enumerate(bounds)
                    },
                )
            )
        return entry, _Build("teacher", "data.train", jobs, start)

    def finish_builds(self, builds: list[_Build]) -> None:
        """Waits for the builds' tasks together (the first failure cancels the rest) and commits each entry.
        Each build is a bar on the timeline from its cache check to its last task's end, and each of its
        tasks a bar of its own: when and where it ran."""
        owner = {ref: build for build in builds for _, _, refs in build.jobs for ref in refs}
        names = [b.step for b in builds if b.jobs]
        outputs = dict(
            zip(
                owner,
                _wait(
                    list(owner),
                    f"{' and '.join(names)} cache{'s' * (len(names) > 1)}",
                    {ref: build.config_field for ref, build in owner.items()},
                ),
            )
        )
        for build in builds:
            for entry, attempt, refs in build.jobs:
                entry.commit(attempt, [outputs[ref]["file"] for ref in refs])
            ran = {name: outputs[ref] for _, _, refs in build.jobs for ref, name in refs.items()}
            end = max((out["end"] for out in ran.values()), default=build.start)
            self.seconds[build.step] = round(end - build.start, 2)
            self.timeline.append(
                {
                    "step": build.step,
                    "start": build.start - self.t0,
                    "end": end - self.t0,
                    "cached": not build.jobs,
                    "node": "driver",
                }
            )
            self._task_bars(ran)

    # -- train ---------------------------------------------------------------------------------
    def finetune(self, prepared: Prepared, inputs: TrainInputs) -> CacheEntry:
        cfg = self.cfg
        calibration = resolved(cfg, prepared.calibration).calibration  # the fine-tune is keyed by the γ it uses
        val_text = prepared.texts.get("val")
        entry = CacheEntry(
            self.root,
            "finetune",
            {
                "recipe": FINETUNE_RECIPE,
                "weights": prepared.teacher.digest,
                "text": prepared.texts["train"].fingerprint,
                "teacher": prepared.teacher_cache.fingerprint,
                "val_text": val_text.fingerprint if val_text else None,
                "seed": cfg.seed,
                "val_robust": cfg.eval.robust if val_text else None,  # what the history's val_robust_acc counts
                "train": cfg.train.model_dump(
                    mode="json",
                    exclude={
                        "num_workers",
                        "cpus_per_worker",
                        "use_gpu",
                        "max_failures",
                        "start_timeout_s",
                        "keep_checkpoints",
                        "recipe",
                    },
                ),
                "calibration": calibration.model_dump(mode="json"),
                "world_size": cfg.train.num_workers,
            },
        )
        if self._cached("train", entry):
            tracking.log_history(self.uri, inputs.run_id, read_history(entry.file_named(HISTORY_FILE)))
            return entry
        name = f"finetune-{entry.fingerprint}"
        if "train" in self.rerun:
            fs, path = filesystem(join(self.checkpoints, name))
            fs.delete_dir_contents(path, missing_dir_ok=True)
        checkpoint = fit(inputs, self.checkpoints, name)
        with entry.attempt() as attempt, checkpoint.as_directory() as d:
            for file in (ENCODER_FILE, HISTORY_FILE):
                upload(Path(d) / file, join(attempt, file))
            entry.commit(attempt, [describe_file(join(attempt, name)) for name in (ENCODER_FILE, HISTORY_FILE)])
        # The epochs the workers could not log (tracking server away, or trained before a restart).
        tracking.log_history(self.uri, inputs.run_id, read_history(entry.file_named(HISTORY_FILE)))
        return entry

    # -- eval ----------------------------------------------------------------------------------
    def evaluate(
        self, prepared: Prepared, encoders: dict[str, str | None], attacks: list[tuple], per_cell: bool = False
    ) -> list[dict]:
        """Zero-shot accuracy of each encoder (None: the teacher, else a weights file) under each (attack, ε, α,
        steps, restarts) on every zero-shot dataset: one row per (dataset, encoder, attack)."""
        return self.finish_eval(self.start_eval(prepared, encoders, attacks, per_cell))

    def start_eval(
        self, prepared: Prepared, encoders: dict[str, str | None], attacks: list[tuple], per_cell: bool = False
    ) -> _Eval:
        """Submits the evaluation and returns at once. Each result is a cache of its own, keyed by the
        encoder's content, the dataset, its class-prompt embeddings and the attack, so a warm run
        evaluates nothing. What is missing runs as one Ray task per dataset, or with per_cell one per
        (dataset, encoder, attack)."""
        cfg = self.cfg
        files = {name: weights for name, weights in encoders.items() if weights is not None}
        light = {"num_cpus": cfg.resources.task_cpus}
        digests = {name: prepared.teacher.digest for name in encoders} | dict(
            zip(
                files,
                _get([steps.file_digest.options(**light).remote(w) for w in files.values()], "eval.matrix.checkpoints"),
            )
        )
        cells = {}  # (dataset key, encoder name, attack) -> its cache entry
        zero_shot = [key for key in prepared.specs if key.startswith("zs")]
        for key in zero_shot:
            for name in encoders:
                for attack in attacks:
                    cells[key, name, attack] = CacheEntry(
                        self.root,
                        "eval",
                        {
                            "recipe": EVAL_RECIPE,
                            "arch": cfg.model.arch,
                            "encoder": digests[name],
                            "dataset": prepared.infos[key].identity,
                            "text": prepared.texts[key].fingerprint,
                            "attack": list(attack),
                            "batch_size": cfg.eval.batch_size,
                            "seed": cfg.seed,
                        },
                    )
        missing = [cell for cell, entry in cells.items() if "eval" in self.rerun or entry.problem(1) is not None]
        self.hits[f"eval {', '.join(encoders)}"] = not missing
        self.log(
            f"[eval {', '.join(encoders)}] {len(cells) - len(missing)} of {len(cells)} results cached"
            + (f", computing {len(missing)}" if missing else ", skipping")
        )
        refs = []
        for key in dict.fromkeys(key for key, _, _ in missing):
            names = list(dict.fromkeys(n for k, n, _ in missing if k == key))
            todo = list(dict.fromkeys(a for k, _, a in missing if k == key))
            groups = (
                [({n: encoders[n]}, [a]) for n in names for a in todo if (key, n, a) in missing]
                if per_cell
                else [({n: encoders[n] for n in names}, todo)]
            )
            text = ray.put(embeddings_of(read_parquet(prepared.texts[key].files())))
            task = steps.evaluate_zero_shot.options(**self._task_resources())
            refs += [
                task.remote(
                    cfg.model.arch,
                    prepared.teacher.weights,
                    group,
                    prepared.specs[key],
                    prepared.teacher.size,
                    text,
                    group_attacks,
                    cfg.eval.batch_size,
                    cfg.seed,
                    cfg.resources.loader_workers,
                )
                for group, group_attacks in groups
            ]
        return _Eval(", ".join(encoders), cells, {prepared.specs[key].name: key for key in zero_shot}, refs)

    def finish_eval(self, pending: _Eval) -> list[dict]:
        """Waits for a start_eval(), caches what it computed and returns every row, cached or not."""
        outputs = _wait(pending.refs, f"zero-shot eval ({pending.label})")
        self._task_bars({f"eval {out['dataset']} ({pending.label})": out for out in outputs})
        computed = [row for out in outputs for row in out["rows"]]
        by_cell = {(pending.key_of[r["dataset"]], r["model"], _attack_of(r)): r for r in computed}
        for cell, row in by_cell.items():
            entry = pending.cells[cell]
            with entry.attempt() as attempt:
                result = {k: v for k, v in row.items() if k != "model"}
                write_bytes(join(attempt, EVAL_FILE), json.dumps(result).encode())
                entry.commit(attempt, [describe_file(join(attempt, EVAL_FILE), rows=1)])
        rows = [
            by_cell.get(cell) or {**json.loads(read_bytes(entry.file_named(EVAL_FILE))), "model": cell[1]}
            for cell, entry in pending.cells.items()
        ]
        return [row | {"robust": row[self.cfg.eval.robust]} for row in rows]

    def _room_beside_training(self) -> bool:
        """Whether the cluster holds the trainer and an eval task at once (room_beside_training). Only then does
        the original's evaluation run while the fine-tune trains: on a smaller cluster it would delay the
        trainer's start (and use up train.start_timeout_s) for no gain."""
        return room_beside_training(self.cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])

    def _task_bars(self, ran: dict[str, dict]) -> None:
        """A timeline bar per Ray task, by name: when (its "start" and "end") and where ("node") it ran."""
        self.timeline += [
            {
                "step": name,
                "start": out["start"] - self.t0,
                "end": out["end"] - self.t0,
                "cached": False,
                "node": out["node"],
            }
            for name, out in ran.items()
        ]

    def _timed(self, name: str, fn, *args):
        """Runs one step, recording its seconds and its bar on the run's timeline (cached: every cache it
        checked was valid)."""
        start, hits_before = time.time(), len(self.hits)
        out = fn(*args)
        end, hits = time.time(), list(self.hits.values())[hits_before:]
        self.seconds[name] = round(end - start, 2)
        self.timeline.append(
            {
                "step": name,
                "start": start - self.t0,
                "end": end - self.t0,
                "cached": bool(hits) and all(hits),
                "node": "driver",
            }
        )
        return out

    def describe(self, training: bool) -> tuple[Teacher, dict[str, DatasetSpec], dict[str, DatasetInfo]]:
        """The teacher, and each dataset's spec and info (classes, size) by key, read by Ray tasks where the
        data is (the driver sees no images). Bad data fails here, before anything is written (pretraining
        included), then bad weights. Zero-shot sets, and for training the training and validation sets."""
        cfg = self.cfg
        light = {"num_cpus": cfg.resources.task_cpus}
        datasets = {f"zs{i}:{d.name}": d for i, d in enumerate(cfg.data.zero_shot)}
        if training:
            datasets = {"train": cfg.data.train} | datasets
            if cfg.train.validation:
                datasets["val"] = cfg.train.validation.dataset
        specs = {key: d.spec(cfg.data.world_seed) for key, d in datasets.items()}
        size = input_size(cfg.model.arch)
        described = {spec: steps.describe_dataset.options(**light).remote(spec, size) for spec in set(specs.values())}
        infos = {key: _get(described[spec], _field(key)) for key, spec in specs.items()}
        self.check_images(specs, infos, size)
        weights = self._timed("pretrain", self.teacher_weights)
        digest, preprocess = _get(
            steps.describe_model.options(**light).remote(cfg.model.arch, weights), "model.weights"
        )
        teacher = Teacher(weights, digest, preprocess)
        if teacher.size != size:
            raise RuntimeError(f"{cfg.model.arch}: its config says {size} px, its model {teacher.size} px")
        return teacher, specs, infos

    def check_images(self, specs: dict[str, DatasetSpec], infos: dict[str, DatasetInfo], size: int) -> None:
        """Every image of each dataset read from a root with corrupt: error decodes, checked by Ray tasks of
        CHECK_SHARD images before anything is written. A dataset found whole is remembered by its identity (its
        files' listing), and a corrupt one is one line naming the file and its config field."""
        builds = {}
        for key, spec in specs.items():
            if spec.kind == "embedded" or spec.corrupt != "error":
                continue
            entry = CacheEntry(self.root, "decodable", {"dataset": infos[key].identity})
            if entry.fingerprint in builds or entry.problem() is None:
                continue
            task, n = steps.find_undecodable.options(num_cpus=self.cfg.resources.task_cpus), infos[key].size
            builds[entry.fingerprint] = (
                key,
                entry,
                [task.remote(spec, size, start, min(start + CHECK_SHARD, n)) for start in range(0, n, CHECK_SHARD)],
            )
        refs = [ref for _, _, shards in builds.values() for ref in shards]
        failures = dict(
            zip(
                refs,
                _wait(refs, "image check", {ref: _field(key) for key, _, shards in builds.values() for ref in shards}),
            )
        )
        for key, _, shards in builds.values():
            found = [line for ref in shards for line in failures[ref]]
            if found:
                more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
                raise ConfigError(f"{_field(key)}: {found[0]}{more}")
        self.checked = [(entry, infos[key].size) for key, entry, _ in builds.values()]

    def remember_checked(self) -> None:
        """Caches the decode checks of check_images, once the whole input is known to be good: bad input
        writes nothing."""
        for entry, size in self.checked:
            with entry.attempt() as attempt:
                write_bytes(join(attempt, "checked.json"), json.dumps({"images": size}).encode())
                entry.commit(attempt, [describe_file(join(attempt, "checked.json"))])
        self.checked = []

    def prepare(self, training: bool) -> Prepared:
        """Everything before training and evaluation: the teacher, the datasets' descriptions (their images
        checked), their text caches and, for training, the teacher cache. The text and teacher caches do not
        depend on each other and build at once."""
        teacher, specs, infos = self.describe(training)
        if training:
            self._check_training_set(infos["train"])
        self.remember_checked()
        with ExitStack() as stack:  # an attempt whose build fails leaves nothing behind
            texts, text_build = self.start_text(teacher, specs, infos, stack)
            cache, teacher_build = (
                self.start_teacher_cache(teacher, specs["train"], infos["train"], stack) if training else (None, None)
            )
            self.finish_builds([b for b in (teacher_build, text_build) if b])
        calibration = (
            self._timed("calibration", self.calibrate, cache, texts["train"])
            if training and self.cfg.calibration.gamma == "auto"
            else None
        )
        return Prepared(teacher, specs, infos, texts, cache, calibration)

    def calibrate(self, teacher_cache: CacheEntry, train_text: CacheEntry) -> Calibration:
        inv_tau = self.cfg.calibration.inv_tau
        fitted = _get(
            steps.calibrate_gamma.options(num_cpus=self.cfg.resources.task_cpus).remote(
                teacher_cache.files(), train_text.files(), inv_tau
            )
        )
        clipped = (
            f" (the NLL still falls up to γ = {fitted.unclipped_gamma:.2f}; γ is at most 1)"
            if fitted.unclipped_gamma > 1
            else ""
        )
        self.log(
            f"[calibration] gamma auto: γ = {fitted.gamma:.3f}, the teacher's NLL minimised on a held-out fifth "
            f"of {self.cfg.data.train.name} at 1/τ = {inv_tau:g}{clipped}"
        )
        return fitted

    def log_calibration(self, run_id: str, calibration: Calibration | None) -> None:
        """The fitted γ as the run's metric calibration_gamma, with the curve it minimised."""
        if calibration is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "calibration.json").write_text(
                json.dumps(asdict(calibration) | {"gamma": calibration.gamma}, indent=1)
            )
            report.plot_calibration(calibration, out / "calibration.png")
            tracking.log_results(
                self.uri,
                run_id,
                {"calibration_gamma": calibration.gamma},
                [out / "calibration.json", out / "calibration.png"],
            )

    # -- models in the MLflow registry --------------------------------------------------------------
    def servable(self, prepared: Prepared, encoder: str | None, encoder_digest: str | None) -> registry.ServableClip:
        """The teacher, with the fine-tuned image tower in the weights file `encoder` (of SHA-256 encoder_digest)
        if given, as a servable CLIP answering with the training set's classes: from the cache, or made by a Ray
        task."""
        teacher, train = prepared.teacher, prepared.infos["train"]
        entry = CacheEntry(
            self.root,
            "servable",
            {
                "weights": teacher.digest,
                "arch": self.cfg.model.arch,
                "example": train.identity,
                "encoder": encoder_digest,
            },
        )
        if not self._cached("model", entry, registry.FINETUNED if encoder else registry.ORIGINAL):
            with entry.attempt() as attempt:
                entry.commit(
                    attempt,
                    _get(
                        steps.servable_clip.options(num_cpus=self.cfg.resources.task_cpus).remote(
                            self.cfg.model.arch,
                            teacher.weights,
                            encoder,
                            prepared.specs["train"],
                            teacher.size,
                            attempt,
                        ),
                        "data.train",
                    ),
                )
        return registry.ServableClip(
            entry.file_named(steps.SERVED_CLIP),
            self.cfg.model.arch,
            train.classnames,
            train.templates,
            read_bytes(entry.file_named(steps.SERVED_EXAMPLE)),
        )

    def register_model(
        self, prepared: Prepared, run_id: str, encoder: str | None, tags: dict[str, str]
    ) -> registry.ModelVersion:
        """The teacher, fine-tuned by the image tower in the weights file `encoder` if given, logged to the run
        as an MLflow model and registered as a version of the model named after the experiment; or the version
        already registered with the same weights (a rerun from warm caches registers nothing new)."""
        teacher = prepared.teacher
        encoder_digest = encoder and _get(
            steps.file_digest.options(num_cpus=self.cfg.resources.task_cpus).remote(encoder)
        )
        digest = fingerprint({"teacher": teacher.digest, "encoder": encoder_digest}) if encoder else teacher.digest
        found = registry.registered_version(self.uri, self.cfg.experiment, digest)
        if found:
            return found
        role = {"role": registry.FINETUNED, "method": self.cfg.train.method} if encoder else {"role": registry.ORIGINAL}
        mine = registry.register(
            self.uri,
            run_id,
            self.cfg.experiment,
            self.servable(prepared, encoder, encoder_digest),
            role | {"weights_digest": teacher.digest, "model_digest": digest} | tags,
        )
        return registry.keep_first(self.uri, mine, digest)

    def register_models(self, prepared: Prepared, run_id: str, rows: list[dict], encoder: str) -> None:
        """The fine-tuned CLIP, and the original teacher when this run evaluated it, each tagged with its zero-shot
        accuracy in the run that registered it; weights registered before keep their version."""
        robust = {"robust": self.cfg.eval.caption()}
        versions = {
            registry.FINETUNED: self.register_model(
                prepared, run_id, encoder, robust | _accuracy_tags(rows, "finetuned")
            )
        }
        if "original_clean" in rows[0]:
            versions[registry.ORIGINAL] = self.register_model(
                prepared, run_id, None, robust | _accuracy_tags(rows, "original")
            )
        self.log(
            f"[registry] {self.cfg.experiment}: "
            + ", ".join(
                f"version {v.version} ({role}{'' if v.run_id == run_id else ', unchanged: registered by run ' + v.run_id})"
                for role, v in versions.items()
            )
        )

    def _check_training_set(self, train: DatasetInfo) -> None:
        cfg = self.cfg
        per_worker = train.size // cfg.train.num_workers
        if per_worker < cfg.train.batch_size:
            raise ConfigError(
                f"train.batch_size: {cfg.train.batch_size} is more than the {per_worker} images each of "
                f"the {cfg.train.num_workers} workers gets from data.train; lower it or raise "
                f"data.train.limit"
            )
        if cfg.teacher_cache_shards > train.size:
            raise ConfigError(
                f"teacher_cache_shards: {cfg.teacher_cache_shards} shards for the {train.size} images of "
                f"data.train; use at most {train.size}"
            )

    def train_inputs(self, prepared: Prepared, run_id: str) -> TrainInputs:
        texts = prepared.texts
        return TrainInputs(
            self.cfg,
            prepared.teacher.weights,
            prepared.teacher.size,
            texts["train"].files(),
            prepared.teacher_cache.files(),
            self.uri,
            run_id,
            texts["val"].files() if "val" in texts else [],
            prepared.calibration,
        )

    def prepare_training(self, run_id: str = "") -> TrainInputs:
        """What a Ray Train run of the fine-tune needs, every cache built."""
        return self.train_inputs(self.prepare(training=True), run_id)

    def run(self, parent_run_id: str | None = None, original: bool = True) -> RunResult:
        """The whole DAG as one MLflow run (nested under parent_run_id if given), started once the
        inputs have been read and the caches built: bad input leaves no run behind. original: also
        evaluate the un-tuned teacher, whose numbers do not depend on the fine-tune."""
        cfg = self.cfg
        tags = {"mlflow.runName": f"{cfg.train.method}-{cfg.data.train.name}"}
        if parent_run_id:
            tags |= {"mlflow.parentRunId": parent_run_id, "mlflow.runName": f"{cfg.train.method}-seed{cfg.seed}"}
        prepared = self.prepare(training=True)
        self._few_classes(prepared, "eval.attack", [a.name for a in (cfg.eval.attack, cfg.eval.quick) if a])
        run_id = tracking.start_run(self.uri, cfg.experiment, cfg.run_params(), tags, cfg.artifact_location)
        with tracking.finishing(self.uri, run_id):
            tracking.tag_run(self.uri, run_id, {"weights_digest": prepared.teacher.digest})
            datasets = dataset_inputs(prepared)
            tracking.log_datasets(self.uri, run_id, datasets)
            if cfg.train.method == "agft":  # the only method whose targets γ shapes
                self.log_calibration(run_id, prepared.calibration)
            attacks = [a.as_tuple() for a in (cfg.eval.attack, cfg.eval.quick) if a]
            # The teacher's numbers do not depend on the fine-tune: evaluated beside it where there is room
            early = (
                self.start_eval(prepared, {"original": None}, attacks)
                if original and self._room_beside_training()
                else None
            )
            tuned = self._timed("train", self.finetune, prepared, self.train_inputs(prepared, run_id))
            later = {"original": None} if original and not early else {}
            results = self._timed(
                "eval",
                lambda: (
                    (self.finish_eval(early) if early else [])
                    + self.evaluate(prepared, later | {"finetuned": tuned.file_named(ENCODER_FILE)}, attacks)
                ),
            )
            headline = [r for r in results if _attack_of(r) == cfg.eval.attack.as_tuple()]
            rows = report.accuracy_rows(headline, [r for r in results if r not in headline])
            self._timed("report", self.publish, run_id, rows, tuned)
            if cfg.register_models:
                self._timed("register", self.register_models, prepared, run_id, rows, tuned.file_named(ENCODER_FILE))
        return RunResult(run_id, rows, self.hits, self.seconds, datasets)

    def run_eval(self) -> RunResult:
        """`agft eval`: the evaluation matrix of eval.matrix, without training."""
        cfg, matrix = self.cfg, self.cfg.eval.matrix
        prepared = self.prepare(training=False)
        note = self._few_classes(prepared, "eval.matrix.attacks", matrix.attacks)
        run_id = tracking.start_run(
            self.uri,
            cfg.experiment,
            cfg.run_params(),
            {"mlflow.runName": "eval-matrix", "kind": "eval"},
            cfg.artifact_location,
        )
        with tracking.finishing(self.uri, run_id):
            tracking.log_datasets(self.uri, run_id, dataset_inputs(prepared))
            attacks = [
                attack_key(attack, eps, matrix.alpha, matrix.steps) for attack in matrix.attacks for eps in matrix.eps
            ]
            results = self._timed(
                "eval", self.evaluate, prepared, {"original": None, **matrix.checkpoints}, attacks, True
            )
            rows = report.matrix_rows(results)
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                (out / "config.yaml").write_text(dump_yaml(cfg))
                report.write_csv(rows, out / "eval_matrix.csv")
                caption = f"Zero-shot top-1 accuracy (%); {ROBUST_MEANING[cfg.eval.robust]}{note}\n\n"
                (out / "eval_matrix.md").write_text(caption + report.table(rows, percent=True))
                report.plot_matrix(rows, out / "eval_matrix.png")
                tracking.log_results(
                    self.uri,
                    run_id,
                    report.matrix_metrics(results),
                    [out / n for n in ("config.yaml", "eval_matrix.csv", "eval_matrix.md", "eval_matrix.png")],
                )
        return RunResult(run_id, rows, self.hits, self.seconds)

    @staticmethod
    def _few_classes(prepared: Prepared, field: str, attacks: list[str]) -> str:
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
        return (
            f"; AutoAttack on {', '.join(few)} (under {AUTOATTACK_MIN_CLASSES} classes): APGD-CE, FAB-T and "
            f"Square, without APGD-T"
            if few and "autoattack" in attacks
            else ""
        )

    def publish(self, run_id: str, rows: list[dict], tuned: CacheEntry) -> None:
        """The run's table, plots, timeline and fine-tuned encoder, to MLflow."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "config.yaml").write_text(dump_yaml(self.cfg))
            report.write_csv(rows, out / "zero_shot_accuracy.csv")
            report.plot_accuracy(
                rows,
                out / "zero_shot_accuracy.png",
                f"{self.cfg.train.method.upper()}: zero-shot clean vs robust accuracy\n{self.cfg.eval.caption()}",
            )
            (out / "timeline.json").write_text(json.dumps(self.timeline, indent=1))
            report.plot_timeline(self.timeline, out / "timeline.png")
            tracking.log_results(
                self.uri,
                run_id,
                report.dataset_metrics(rows),
                [
                    out / n
                    for n in (
                        "config.yaml",
                        "zero_shot_accuracy.csv",
                        "zero_shot_accuracy.png",
                        "timeline.json",
                        "timeline.png",
                    )
                ]
                + [Path(local_path(tuned.file_named(ENCODER_FILE)))],
            )
