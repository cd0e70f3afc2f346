"""Stage pretrain (the embedded default only): the teacher, contrastively pretrained on the built-in world by one
Ray task, cached by everything it is a function of."""

from __future__ import annotations

import ray

from agft_core import world
from agft_core.cache import CacheEntry
from agft_core.pretrain import VERSION, resolve_amp
from pipeline.cluster import alive_nodes
from pipeline.config.schema import Config
from pipeline.context import RunContext
from pipeline.remote import get
from tasks.pretrain import pretrain_teacher


def settings(cfg: Config) -> dict:
    """Every pretrain field, pretrain.amp's auto resolved on this machine: the teacher's key names the precision
    it was pretrained in (a teacher keyed so before auto existed is found again), and the task is told it."""
    return cfg.pretrain.model_dump() | {"amp": resolve_amp(cfg.pretrain.amp)}


def cache_key(cfg: Config) -> dict:
    """Every pretrain setting, the model, the world and the pretraining code's version."""
    return {
        "arch": cfg.model.arch,
        "recipe": VERSION,  # the key's name predates "version": renaming it would orphan every cached teacher
        "world": world.fingerprint(),
        "world_seed": cfg.data.world_seed,
        "pretrain": settings(cfg),
    }


def teacher_weights(ctx: RunContext) -> str | None:
    """The teacher's weights file: model.weights itself, None for a random init, or the embedded teacher from
    its cache, pretrained first if missing."""
    model = ctx.cfg.model
    if model.weights == "random":
        return None
    if model.weights != "embedded":
        return model.weights
    entry = CacheEntry(ctx.cache_root, "pretrain", cache_key(ctx.cfg))
    if not ctx.cached("pretrain", entry):
        with entry.attempt() as attempt:
            task = pretrain_teacher.options(num_cpus=_biggest_node_cpus())
            world_seed = ctx.cfg.data.world_seed
            entry.commit(
                attempt,
                get(task.remote(model.arch, world_seed=world_seed, out_dir=attempt, settings=settings(ctx.cfg))),
            )
    return entry.files()[0]


def _biggest_node_cpus() -> int:
    """All the CPUs of the biggest node: pretraining is one process and cannot span nodes."""
    per_node = [node.get("CPU", 0) for node in alive_nodes()]
    return max(1, int(min(max(per_node, default=1), ray.available_resources().get("CPU", 1))))
