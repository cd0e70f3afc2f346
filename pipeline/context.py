"""What the stages of one command share (RunContext) and what they hand each other (Teacher, Datasets,
Prepared)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agft_core.cache import CacheEntry, absolute, join
from agft_core.calibration import Calibration
from agft_core.catalog import DatasetInfo, DatasetSpec
from pipeline.config.schema import Config
from tasks.common import ModelSource


@dataclass
class RunContext:
    """One command's config, its tracking server, the steps to recompute, where its lines go, and its record:
    each cache checked (hit or not), each step's seconds, a timeline bar per step and per Ray task (start,
    end in seconds since t0, whether cached, on which node), and what failed without stopping the command
    (an eval shard after its retries), one line each."""

    cfg: Config
    tracking_uri: str
    rerun: frozenset[str] = frozenset()
    log: Callable[[str], None] = print
    hits: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.time)

    @property
    def cache_root(self) -> str:
        return absolute(self.cfg.cache_dir)

    def storage(self, default_folder: str) -> str:
        """Where Ray Train/Tune keep their runs: storage_path, else a folder of the cache root."""
        return absolute(self.cfg.storage_path) if self.cfg.storage_path else join(self.cache_root, default_folder)

    def task_options(self) -> dict[str, float]:
        """What a DAG task that computes on images (caches, eval) asks Ray for: resources.task_cpus and task_gpus."""
        return {"num_cpus": self.cfg.resources.task_cpus, "num_gpus": self.cfg.resources.task_gpus}

    def cpu_options(self) -> dict[str, float]:
        """What a DAG task that needs no GPU (descriptions, decode checks, digests, the γ fit, servable files) asks
        Ray for: resources.task_cpus."""
        return {"num_cpus": self.cfg.resources.task_cpus}

    def cached(self, step: str, entry: CacheEntry, label: str = "", expected_rows: int | None = None) -> bool:
        """Whether entry holds a valid result (and --rerun does not name its step), said in one line."""
        problem = "rerun requested" if step in self.rerun else entry.problem(expected_rows)
        hit = problem is None
        name = f"{step} {label}".strip()
        self.hits[name] = hit
        where = f"{entry.kind}/{entry.fingerprint}"
        self.log(f"[{name}] cached, skipping ({where})" if hit else f"[{name}] building: {problem} -> {where}")
        return hit

    def timed(self, name: str, fn, *args):
        """Runs one step, recording its seconds and its bar on the timeline (cached: every cache it checked
        was valid)."""
        start, hits_before = time.time(), len(self.hits)
        out = fn(*args)
        end, hits = time.time(), list(self.hits.values())[hits_before:]
        self.seconds[name] = round(end - start, 2)
        self.bar(name, start, end, cached=bool(hits) and all(hits))
        return out

    def bar(self, step: str, start: float, end: float, cached: bool, node: str = "driver") -> None:
        self.timeline.append(
            {"step": step, "start": start - self.t0, "end": end - self.t0, "cached": cached, "node": node}
        )

    def task_bars(self, ran: dict[str, dict]) -> None:
        """A bar per Ray task, by name: when (its "start" and "end") and where ("node") it ran."""
        for name, out in ran.items():
            self.bar(name, out["start"], out["end"], cached=False, node=out["node"])


@dataclass(frozen=True)
class Teacher:
    """The model every stage starts from: its architecture, its weights (None: a random init), their content
    digest and the preprocessing its image tower expects."""

    arch: str
    weights: str | None
    digest: str
    preprocess: dict

    @property
    def size(self) -> int:
        return self.preprocess["size"][0]

    @property
    def source(self) -> ModelSource:
        """What a task needs to load it."""
        return ModelSource(self.arch, self.weights, self.size)


@dataclass(frozen=True)
class Datasets:
    """Every dataset a command reads, by key: "zs<i>:<name>" (zero-shot) and, when training, "train" and "val".
    checked: the decode checks found whole, to remember once the whole input is known to be good."""

    specs: dict[str, DatasetSpec]
    infos: dict[str, DatasetInfo]
    checked: list[tuple[CacheEntry, int]]


@dataclass(frozen=True)
class Prepared:
    """What the stages before training and evaluation hand on: the teacher, the datasets, their class-prompt
    caches and, when training, the teacher cache (for methods that read it) and γ fitted on it."""

    teacher: Teacher
    datasets: Datasets
    texts: dict[str, CacheEntry]
    teacher_cache: CacheEntry | None = None
    calibration: Calibration | None = None

    @property
    def specs(self) -> dict[str, DatasetSpec]:
        return self.datasets.specs

    @property
    def infos(self) -> dict[str, DatasetInfo]:
        return self.datasets.infos
