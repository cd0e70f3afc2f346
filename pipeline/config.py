"""The one typed config: loaded from YAML, overridden with --set, validated before any Ray work."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from agft_core import datasets
from agft_core.model import EMBEDDED_ARCH, architectures, is_weights_file

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ValueError):
    """Bad input: one line naming the field or file and what would be valid."""


def _fraction(value: Any) -> Any:
    # Lets YAML say ε: 1/255 the way papers write it.
    if isinstance(value, str) and "/" in value:
        numerator, _, denominator = value.partition("/")
        try:
            return float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"not a number or fraction like 1/255: {value!r}") from exc
    return value


PixelBudget = Annotated[float, BeforeValidator(_fraction), Field(ge=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    arch: str = EMBEDDED_ARCH
    # "embedded": pretrained by this pipeline on the built-in world; "random": explicit random
    # init; a path: a local weights file; anything else: an open_clip pretrained tag.
    weights: str = "embedded"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in architectures():
            raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        return arch

    @model_validator(mode="after")
    def _known_weights(self) -> "ModelConfig":
        if self.weights == "embedded" and self.arch != EMBEDDED_ARCH:
            raise ValueError(f"weights 'embedded' exists only for arch {EMBEDDED_ARCH!r}")
        if self.weights not in ("embedded", "random") and not is_weights_file(self.weights):
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(self.arch)
            if self.weights not in tags:
                raise ValueError(f"unknown pretrained tag {self.weights!r} for {self.arch}; valid: "
                                 f"embedded, random, a weights file path, or one of {tags}")
        return self

    @property
    def weights_file(self) -> str | None:
        return self.weights if is_weights_file(self.weights) else None


class PretrainConfig(Section):
    """Contrastive pretraining of the embedded teacher (used only when model.weights is 'embedded')."""

    corpus_size: int = Field(20000, gt=0)
    epochs: int = Field(8, gt=0)
    batch_size: int = Field(256, gt=1)
    lr: float = Field(2e-3, gt=0)


class DatasetConfig(Section):
    kind: str = "embedded"
    name: str
    split: str = "test"
    root: str | None = None
    limit: int | None = Field(None, gt=0)
    templates: list[str] | None = Field(None, min_length=1, description="prompt templates with one {}")

    @model_validator(mode="after")
    def _known_dataset(self) -> "DatasetConfig":
        datasets.check_spec(self.kind, self.name, self.split, self.root)
        for template in self.templates or ():
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one {{}} for the class name")
        return self

    def spec(self, world_seed: int) -> datasets.DatasetSpec:
        templates = tuple(self.templates) if self.templates else None
        return datasets.DatasetSpec(self.kind, self.name, self.split, self.root, self.limit, world_seed, templates)


class DataConfig(Section):
    world_seed: int = 0
    train: DatasetConfig = DatasetConfig(name="shapes", split="train")
    zero_shot: list[DatasetConfig] = Field(min_length=1, default_factory=lambda: [
        DatasetConfig(name=n) for n in ("shapes", "colours", "backgrounds", "positions", "sizes")])


class CalibrationConfig(Section):
    gamma: float = Field(0.4, gt=0, le=1)
    inv_tau: float = Field(180.0, gt=0)


class AttackConfig(Section):
    eps: PixelBudget = 1 / 255
    alpha: PixelBudget = 1 / 255
    steps: int = Field(2, ge=0)


class TrainConfig(Section):
    method: Literal["agft", "tecoa"] = "agft"
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0, description="per worker")
    lr: float = Field(4e-4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(1000, ge=0)
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    amp: Literal["off", "bf16", "fp16"] = "off"
    max_failures: int = Field(2, ge=0)
    attack: AttackConfig = AttackConfig()


class EvalConfig(Section):
    batch_size: int = Field(256, gt=0)
    attack: AttackConfig = AttackConfig(steps=20)


class Config(Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    data: DataConfig = DataConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cache_dir: str = ".agft-cache"
    experiment: str = "agft"
    teacher_cache_shards: int = Field(2, gt=0)


def _format(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. train.epochs=2")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config {path}: {_format(exc)}") from exc


def preflight(cfg: Config) -> None:
    """Checks against the file system, done before any Ray work: roots and weights must exist."""
    for where, dataset in [("data.train", cfg.data.train)] + [
            (f"data.zero_shot.{i}", d) for i, d in enumerate(cfg.data.zero_shot)]:
        problem = datasets.check_root(dataset.spec(cfg.data.world_seed))
        if problem:
            raise ConfigError(f"{where}: {problem}")
    weights = cfg.model.weights_file
    if weights and not Path(weights).is_file():
        raise ConfigError(f"model.weights: weights file {weights} does not exist")


def tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    A relative SQLite path is made absolute: Ray workers run in other directories.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
