"""Sizes the end-to-end tests share (a teacher pretrained in seconds and one small zero-shot set), and how they
reach the CLI."""

from collections.abc import Iterable

TEACHER = ["pretrain.corpus_size=256", "pretrain.epochs=1", "pretrain.batch_size=64"]
ONE_ZERO_SHOT = "data.zero_shot=[{name: colours, limit: 32}]"


def sets(overrides: Iterable[str]) -> list[str]:
    """--set FIELD=VALUE for each override, as `agft` takes them."""
    return [arg for override in overrides for arg in ("--set", override)]


def prepared_by_hand(cfg, digest: str = "digest", teacher_cache: bool = False):
    """What the stages before training hand on (pipeline.context.Prepared) for cfg's embedded datasets, built in
    this process without Ray: the datasets described by agft_core, a teacher of the given weights digest, and
    prompt and teacher caches that stand for their keys (nothing is written). For tests of the keys built on it."""
    from agft_core.cache import CacheEntry
    from agft_core.datasets import load_dataset
    from pipeline.context import Datasets, Prepared, Teacher

    seed = cfg.data.world_seed
    specs = {"train": cfg.data.train.spec(seed)}
    if cfg.train.validation:
        specs["val"] = cfg.train.validation.dataset.spec(seed)
    infos = {name: load_dataset(spec, 32).info() for name, spec in specs.items()}
    return Prepared(
        teacher=Teacher(cfg.model.arch, None, digest, {"size": (32, 32)}),
        datasets=Datasets(specs, infos, []),
        texts={name: CacheEntry("cache", "text", {"classes": info.classnames}) for name, info in infos.items()},
        teacher_cache=CacheEntry("cache", "teacher", {"dataset": infos["train"].identity}) if teacher_cache else None,
    )
