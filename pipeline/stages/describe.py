"""Stage describe: each dataset's classes, size and identity, its images checked to decode, and the teacher's
digest and preprocessing, all read by Ray tasks where the data and weights are (the driver sees neither). Bad
input fails here, before anything is written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from agft_core import world
from agft_core.cache import CacheEntry, absolute, describe_file, fingerprint, join, write_bytes
from agft_core.catalog import DatasetInfo, DatasetSpec, is_uri
from agft_core.model import input_size
from agft_core.subsets import image_ranges
from pipeline.config.sections import ConfigError
from pipeline.context import Datasets, Prepared, RunContext, Teacher
from pipeline.remote import get, wait
from tasks import describe as tasks

CHECK_SHARD = 5000  # images per Ray task of the decode check


def dataset_field(key: str) -> str:
    """The config field of a dataset key of Datasets."""
    if key.startswith("zs"):
        return f"data.zero_shot.{key[2:].split(':')[0]}"
    return {"train": "data.train", "val": "train.validation.dataset"}[key]


def datasets(ctx: RunContext, training: bool) -> Datasets:
    """The zero-shot sets and, for training, the training and validation sets: their specs and infos by key,
    every image of a root with corrupt: error checked. A dataset two keys share is read once."""
    cfg = ctx.cfg
    configured = {f"zs{i}:{d.name}": d for i, d in enumerate(cfg.data.zero_shot)}
    if training:
        configured = {"train": cfg.data.train} | configured
        if cfg.train.validation:
            configured["val"] = cfg.train.validation.dataset
    size = input_size(cfg.model.arch)
    specs = _skip_undecodable(ctx, {key: d.spec(cfg.data.world_seed) for key, d in configured.items()}, size)
    task = tasks.describe_dataset.options(**ctx.cpu_options())
    described = {spec: task.remote(spec, image_size=size) for spec in set(specs.values())}
    infos = {key: get(described[spec], dataset_field(key)) for key, spec in specs.items()}
    return Datasets(specs, infos, _check_images(ctx, specs, infos, size))


def _skip_undecodable(ctx: RunContext, specs: dict[str, DatasetSpec], size: int) -> dict[str, DatasetSpec]:
    """specs with the images that fail to decode in each dataset read with corrupt: skip found by Ray tasks of
    CHECK_SHARD images, once, and named in the spec: every process that loads it leaves the same images out without
    decoding them all first (a transient read error in one would have shifted its indices against the others')."""
    fields = {}
    for key, spec in specs.items():  # a dataset two keys share is named by the first (data.train before zero-shot)
        fields.setdefault(spec, dataset_field(key))
    to_scan = [s for s in set(specs.values()) if s.kind != "embedded" and s.corrupt == "skip" and s.skipped is None]
    describe = tasks.describe_dataset.options(**ctx.cpu_options())
    wholes = {spec: replace(spec, skipped=()) for spec in to_scan}
    described = {spec: describe.remote(whole, image_size=size) for spec, whole in wholes.items()}
    scans = {
        spec: _decode_checks(ctx, whole, get(described[spec], fields[spec]).size, size)
        for spec, whole in wholes.items()
    }
    shard_fields = {ref: fields[spec] for spec, refs in scans.items() for ref in refs}
    found = dict(zip(shard_fields, wait(list(shard_fields), "image check", shard_fields)))
    scanned = {}
    for spec, refs in scans.items():
        bad = {i: line for ref in refs for i, line in found[ref].items()}
        if bad:
            # "<name>: corrupt image <file> (<the decoder's error>); <advice to skip>" -> its file and error
            first = bad[min(bad)].split(";")[0].removeprefix(f"{spec.name}: ")
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            ctx.log(f"[data] {fields[spec]}: corrupt: skip leaves out the {first}{more}")
        scanned[spec] = replace(spec, skipped=tuple(sorted(bad)))
    return {key: scanned.get(spec, spec) for key, spec in specs.items()}


def _decode_checks(ctx: RunContext, spec: DatasetSpec, images: int, size: int) -> list:
    """Ray tasks that decode the dataset's images, CHECK_SHARD each: {index: error line} of those that fail."""
    task = tasks.find_undecodable.options(**ctx.cpu_options())
    return [task.remote(spec, image_size=size, start=a, stop=b) for a, b in image_ranges(images, CHECK_SHARD)]


def _check_images(
    ctx: RunContext, specs: dict[str, DatasetSpec], infos: dict[str, DatasetInfo], size: int
) -> list[tuple[CacheEntry, int]]:
    """Every image of each dataset read from a root with corrupt: error decodes, checked by Ray tasks of
    CHECK_SHARD images before anything is written. A corrupt one is one line naming the file and its config
    field. Returns the datasets found whole, to be remembered by their identity (remember_checked)."""
    builds = {}
    for key, spec in specs.items():
        if spec.kind == "embedded" or spec.corrupt != "error":
            continue
        entry = CacheEntry(ctx.cache_root, "decodable", {"dataset": infos[key].identity})
        if entry.fingerprint in builds or entry.problem() is None:
            continue
        builds[entry.fingerprint] = (key, entry, _decode_checks(ctx, spec, infos[key].size, size))
    fields = {ref: dataset_field(key) for key, _, shards in builds.values() for ref in shards}
    failures = dict(zip(fields, wait(list(fields), "image check", fields)))
    for key, _, shards in builds.values():
        found = [line for ref in shards for line in failures[ref].values()]
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ConfigError(f"{dataset_field(key)}: {found[0]}{more}")
    return [(entry, infos[key].size) for key, entry, _ in builds.values()]


def check_training_set(ctx: RunContext, train: DatasetInfo) -> None:
    """What the training set's size rules out: a batch per worker, a teacher-cache shard per image."""
    cfg = ctx.cfg
    per_worker = train.size // cfg.train.num_workers
    if per_worker < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is more than the {per_worker} images each of "
            f"the {cfg.train.num_workers} workers gets from data.train; lower it or raise data.train.limit"
        )
    if cfg.teacher_cache_shards > train.size:
        raise ConfigError(
            f"teacher_cache_shards: {cfg.teacher_cache_shards} shards for the {train.size} images of "
            f"data.train; use at most {train.size}"
        )


def remember_checked(datasets: Datasets) -> None:
    """Caches the decode checks, once the whole input is known to be good: bad input writes nothing."""
    for entry, size in datasets.checked:
        with entry.attempt() as attempt:
            write_bytes(join(attempt, "checked.json"), json.dumps({"images": size}).encode())
            entry.commit(attempt, [describe_file(join(attempt, "checked.json"))])


def teacher(ctx: RunContext, weights: str | None) -> Teacher:
    """The teacher of these weights: its digest and preprocessing, read where the weights are."""
    arch = ctx.cfg.model.arch
    task = tasks.describe_model.options(**ctx.cpu_options())
    digest, preprocess = get(task.remote(arch, weights), "model.weights")
    described = Teacher(arch, weights, digest, preprocess)
    if described.size != input_size(arch):
        raise RuntimeError(f"{arch}: its config says {input_size(arch)} px, its model {described.size} px")
    return described


def dataset_inputs(prepared: Prepared) -> list[dict]:
    """The datasets a run reads, as tracking.log_datasets takes them. The digest is of what identifies their
    content (the generated pixels, or a root's path and file listing), not of the preprocessing, so runs of two
    models on the same data share it."""
    inputs = []
    for key, spec in prepared.specs.items():
        info = prepared.infos[key]
        if spec.kind == "embedded":
            tags = {"generator": "agft_core.world", "world": world.fingerprint(), "world_seed": str(spec.world_seed)}
            source_type, source = "code", {"tags": tags | {"split": spec.split}}
        else:
            uri = spec.root if is_uri(spec.root) else Path(absolute(spec.root)).as_uri()
            scheme = uri.split("://", 1)[0]
            source_type, source = "local" if scheme == "file" else scheme, {"uri": uri, "split": spec.split}
            if "limit" in info.identity:  # which subset: the UI shows it beside the digest that covers it
                source |= {k: info.identity[k] for k in ("limit", "subset_seed", "stratified")}
        identity = {k: v for k, v in info.identity.items() if k != "size"}
        context = {"train": "training", "val": "validation"}.get(key, "evaluation")
        inputs.append(
            {
                "name": info.name,
                "digest": fingerprint(identity),
                "source_type": source_type,
                "source": source,
                "context": context,
            }
        )
    return inputs
