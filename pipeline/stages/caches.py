"""Stage caches: the class-prompt embeddings of every dataset (one Parquet each) and, for a method that reads
it, the frozen teacher's image embeddings of the training set (sharded Parquet, by tasks that decode their own
images or through Ray Data: data.decode). Both build at once; each is content-addressed by the weights, the
dataset, the preprocessing and the prompts, not by who decoded the images."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass

from agft_core.cache import CacheEntry, join
from agft_core.catalog import METHOD_SPECS
from pipeline.cluster import alive_nodes, streaming_plan
from pipeline.config.schema import Config
from pipeline.context import Datasets, RunContext, Teacher
from pipeline.remote import wait
from tasks.caches import embed_class_prompts, teacher_shard
from tasks.streaming import stream_teacher_cache


@dataclass
class _Build:
    """A cache step under way: for each entry it builds, the attempt folder and the Ray tasks filling it."""

    step: str
    config_field: str | None  # where a task's bad input is reported
    jobs: list[tuple[CacheEntry, str, dict]]  # (entry, attempt, {ref of a task writing a file: the task's name})
    start: float  # time.time() before its caches were checked


def needs_teacher_cache(cfg: Config) -> bool:
    """The method reads the teacher's embeddings, or calibration.gamma: auto is fitted on them."""
    return METHOD_SPECS[cfg.train.method].teacher_cache or cfg.calibration.gamma == "auto"


def build(
    ctx: RunContext, teacher: Teacher, datasets: Datasets, training: bool
) -> tuple[dict[str, CacheEntry], CacheEntry | None]:
    """The text cache of every dataset and, when training a method that needs it, the teacher cache: from the
    cache where valid, else built. An attempt whose build fails leaves nothing behind."""
    with ExitStack() as stack:
        texts, text_build = _start_text(ctx, teacher, datasets, stack)
        builds = [text_build]
        teacher_cache = None
        if training and needs_teacher_cache(ctx.cfg):
            teacher_cache, teacher_build = _start_teacher_cache(ctx, teacher, datasets, stack)
            builds.insert(0, teacher_build)
        _finish(ctx, builds)
    return texts, teacher_cache


def _start_text(ctx: RunContext, teacher: Teacher, datasets: Datasets, stack: ExitStack):
    start, entries, pending = time.time(), {}, {}
    for key, info in datasets.infos.items():
        entry = CacheEntry(
            ctx.cache_root,
            "text",
            {
                "weights": teacher.digest,
                "arch": teacher.arch,
                "dataset": info.name,
                "classnames": info.classnames,
                "templates": info.templates,
            },
        )
        seen = any(e.fingerprint == entry.fingerprint for e in entries.values())  # one task, two splits
        entries[key] = entry
        label = info.name if key.startswith("zs") else f"{info.name} ({key})"
        if not seen and not ctx.cached("text", entry, label, len(info.classnames)):
            pending[entry.fingerprint] = (entry, datasets.specs[key], label)
    task = embed_class_prompts.options(**ctx.task_options())
    jobs = []
    for entry, spec, label in pending.values():
        attempt = stack.enter_context(entry.attempt())
        ref = task.remote(teacher.source, spec, out_path=join(attempt, "part-00000.parquet"))
        jobs.append((entry, attempt, {ref: f"text {label}"}))
    return entries, _Build("text", None, jobs, start)


def _start_teacher_cache(ctx: RunContext, teacher: Teacher, datasets: Datasets, stack: ExitStack):
    cfg, spec, info = ctx.cfg, datasets.specs["train"], datasets.infos["train"]
    entry = CacheEntry(
        ctx.cache_root,
        "teacher",
        {"weights": teacher.digest, "dataset": info.identity, "preprocess": teacher.preprocess},
    )
    start, n, jobs = time.time(), info.size, []
    if not ctx.cached("teacher", entry, info.name, n):
        attempt = stack.enter_context(entry.attempt())
        if cfg.data.decode == "ray_data":
            plan = streaming_plan(cfg, alive_nodes(), cfg.eval.batch_size)
            ref = stream_teacher_cache.remote(teacher.source, spec, size=n, plan=plan, out_dir=attempt)
            jobs.append((entry, attempt, {ref: f"teacher cache through Ray Data ({plan.decoders} decoders)"}))
            return entry, _Build("teacher", "data.train", jobs, start)
        shards = cfg.teacher_cache_shards
        task = teacher_shard.options(**ctx.task_options())
        refs = {}
        for i in range(shards):
            ref = task.remote(
                teacher.source,
                spec,
                start=n * i // shards,
                stop=n * (i + 1) // shards,
                batch_size=cfg.eval.batch_size,
                loader_workers=cfg.resources.loader_processes(cfg.resources.task_cpus),
                out_path=join(attempt, f"part-{i:05d}.parquet"),
            )
            refs[ref] = f"teacher shard {i + 1}/{shards}"
        jobs.append((entry, attempt, refs))
    return entry, _Build("teacher", "data.train", jobs, start)


def _finish(ctx: RunContext, builds: list[_Build]) -> None:
    """Waits for the builds' tasks together (the first failure cancels the rest) and commits each entry.
    Each build is a bar on the timeline from its cache check to its last task's end, and each of its
    tasks a bar of its own: when and where it ran."""
    owner = {ref: build for build in builds for _, _, refs in build.jobs for ref in refs}
    names = [b.step for b in builds if b.jobs]
    label = f"{' and '.join(names)} cache{'s' * (len(names) > 1)}"
    outputs = dict(zip(owner, wait(list(owner), label, {ref: build.config_field for ref, build in owner.items()})))
    for build in builds:
        for entry, attempt, refs in build.jobs:
            entry.commit(attempt, [file for ref in refs for file in outputs[ref]["files"]])
        ran = {name: outputs[ref] for _, _, refs in build.jobs for ref, name in refs.items()}
        end = max((out["end"] for out in ran.values()), default=build.start)
        ctx.seconds[build.step] = round(end - build.start, 2)
        ctx.bar(build.step, build.start, end, cached=not build.jobs)
        ctx.task_bars(ran)
