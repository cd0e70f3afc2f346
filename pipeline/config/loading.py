"""Reading a config: a YAML file (or the name of a shipped one) with --set FIELD=VALUE overrides, and writing
one back."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.config.schema import Config, describe_errors, set_dotted
from pipeline.config.sections import ConfigError

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # installed as package data
DEFAULT_CONFIG = SHIPPED_CONFIGS / "demo.yaml"


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. train.epochs=2")
    set_dotted(raw, key, yaml.safe_load(value))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: plain YAML keeps the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """path: a YAML file, or the name of a shipped config (`vitb32_imagenet`, `configs/demo.yaml`)."""
    path = Path(path) if path else DEFAULT_CONFIG
    shipped = SHIPPED_CONFIGS / Path(path).with_suffix(".yaml").name
    if not path.is_file() and not path.is_absolute() and shipped.is_file():
        path = shipped
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config {path}: {describe_errors(exc)}") from exc


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
