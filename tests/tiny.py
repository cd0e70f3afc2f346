"""Sizes the end-to-end tests share (a teacher pretrained in seconds and one small zero-shot set), and how they
reach the CLI."""

from collections.abc import Iterable

TEACHER = ["pretrain.corpus_size=256", "pretrain.epochs=1", "pretrain.batch_size=64"]
ONE_ZERO_SHOT = "data.zero_shot=[{name: colours, limit: 32}]"


def sets(overrides: Iterable[str]) -> list[str]:
    """--set FIELD=VALUE for each override, as `agft` takes them."""
    return [arg for override in overrides for arg in ("--set", override)]
