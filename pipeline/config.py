"""The one typed config: loaded from YAML, overridden with --set, validated before any Ray work."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from agft_core import catalog, world
from agft_core.catalog import (
    ATTACKS,
    EMBEDDED_ARCH,
    METHODS,
    ROBUST_DEFINITIONS,
    architectures,
    attack_key,
    check_location,
    has_vit_tower,
    is_weights_file,
)
from agft_core.errors import InputError

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # installed as package data
DEFAULT_CONFIG = SHIPPED_CONFIGS / "demo.yaml"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(InputError):
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
# YAML 1.1 reads a bare `off` as false: `amp: off` means the string
_yaml_false_as_off = BeforeValidator(lambda value: "off" if value is False else value)


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
    def _known_weights(self) -> ModelConfig:
        if self.weights == "embedded" and self.arch != EMBEDDED_ARCH:
            raise ValueError(f"weights 'embedded' exists only for arch {EMBEDDED_ARCH!r}")
        if self.weights not in ("embedded", "random") and not is_weights_file(self.weights):
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(self.arch)
            if self.weights not in tags:
                raise ValueError(
                    f"unknown pretrained tag {self.weights!r} for {self.arch}; valid: "
                    f"embedded, random, a weights file path, or one of {tags}"
                )
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
    seed: int = Field(0, description="the teacher's own seed: `seed` varies the fine-tune, not the teacher")
    amp: Annotated[Literal["off", "bf16"], _yaml_false_as_off] = Field(
        "bf16",
        description="bf16 autocast of the towers (pretraining runs on the CPU): off on a CPU without native "
        "bf16, where bf16 is emulated and slower",
    )


class DatasetConfig(Section):
    kind: str = "embedded"
    name: str
    split: str = "test"
    root: str | None = None
    limit: int | None = Field(
        None,
        gt=0,
        description="a random subset of this many images, stratified by class "
        "where the labels are known, the same in every run",
    )
    subset_seed: int = Field(0, description="which subset `limit` draws")
    templates: list[str] | None = Field(None, min_length=1, description="prompt templates with one {}")
    corrupt: Literal["error", "skip"] = Field(
        "error", description="images that fail to decode: stop naming the file, or leave each out and report it"
    )

    @model_validator(mode="after")
    def _known_dataset(self) -> DatasetConfig:
        catalog.check_spec(self.kind, self.name, self.split, self.root)
        for template in self.templates or ():
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one {{}} for the class name")
        return self

    def spec(self, world_seed: int) -> catalog.DatasetSpec:
        templates = tuple(self.templates) if self.templates else None
        return catalog.DatasetSpec(
            self.kind,
            self.name,
            self.split,
            self.root,
            self.limit,
            world_seed,
            templates,
            self.corrupt,
            self.subset_seed,
        )


class DataConfig(Section):
    world_seed: int = 0
    train: DatasetConfig = DatasetConfig(name=world.FINE_TUNING_TASK, split="train")
    zero_shot: list[DatasetConfig] = Field(
        min_length=1,
        default_factory=lambda: [DatasetConfig(name=n) for n in (world.FINE_TUNING_TASK, *world.ZERO_SHOT_SUITE)],
    )

    @field_validator("zero_shot")
    @classmethod
    def _distinct_names(cls, zero_shot: list[DatasetConfig]) -> list[DatasetConfig]:
        names = [d.name for d in zero_shot]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # results, metrics and plots are keyed by the name
            raise ValueError(f"dataset names must differ; {', '.join(twice)} appears more than once (rename one)")
        return zero_shot


def _gamma(value: Any) -> Any:
    if value == "auto":
        return value
    try:
        gamma = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number; use a number in (0, 1] or auto") from None
    if not 0 < gamma <= 1:
        raise ValueError(f"{value!r} is not in (0, 1]; use a number in (0, 1] or auto")
    return gamma


class CalibrationConfig(Section):
    # auto: the teacher's temperature-scaling fit on the teacher cache (agft_core/calibration.py)
    gamma: Annotated[float | Literal["auto"], BeforeValidator(_gamma)] = 0.4
    inv_tau: float = Field(180.0, gt=0)


class AttackConfig(Section):
    eps: PixelBudget = 1 / 255
    alpha: PixelBudget = 1 / 255
    steps: int = Field(2, ge=0)


class EvalAttack(AttackConfig):
    """An attack the evaluation reports: apgd-ce and autoattack choose their own step sizes (no α)."""

    name: Literal[ATTACKS] = "pgd"
    steps: int = Field(20, gt=0, description="iterations (pgd, cw, apgd-ce)")
    restarts: int = Field(1, gt=0, description="apgd-ce: runs from new random starts on what the last one did not fool")

    @model_validator(mode="after")
    def _restarts_only_for_apgd(self) -> EvalAttack:
        if self.restarts > 1 and self.name != "apgd-ce":
            raise ValueError(f"restarts: only apgd-ce restarts, not {self.name}")
        return self

    def label(self) -> str:
        """How every table names it, e.g. "PGD-20 (α = 1/255), ε = 1/255"."""
        name, eps, alpha, steps, restarts = self.as_tuple()
        return (
            name.upper()
            + (f"-{steps}" if steps is not None else "")
            + (f" × {restarts} restarts" if restarts > 1 else "")
            + (f" (α = {255 * alpha:g}/255)" if alpha is not None else "")
            + f", ε = {255 * eps:g}/255"
        )

    def as_tuple(self) -> tuple:
        return attack_key(self.name, self.eps, self.alpha, self.steps, self.restarts)


class ValidationConfig(Section):
    """A held-out set scored every epoch (clean and robust), e.g. for ASHA in a sweep."""

    dataset: DatasetConfig
    attack: AttackConfig = AttackConfig(eps=2 / 255, alpha=1 / 255, steps=3)


class LossWeights(Section):
    alpha: float = Field(ge=0)
    beta: float = Field(ge=0)


# Each method as its authors trained it (README, "Published recipes", gives the source of every value). The
# budget (epochs, batch size, warm-up) stays the config's, so that every method gets the same one.
PUBLISHED_RECIPES = {
    "agft": {
        "optimizer": "sgd",
        "lr": 4e-4,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "attack": {"eps": 1 / 255, "alpha": 1 / 255, "steps": 2},
    },
    "tecoa": {
        "optimizer": "sgd",
        "lr": 1e-5,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "attack": {"eps": 1 / 255, "alpha": 1 / 255, "steps": 2},
    },
    "pmg_aft": {
        "optimizer": "sgd",
        "lr": 5e-5,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "attack": {"eps": 1 / 255, "alpha": 1 / 255, "steps": 2},
    },
    "fare": {
        "optimizer": "adamw",
        "lr": 1e-5,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "attack": {"eps": 4 / 255, "alpha": 1 / 255, "steps": 10},
    },
    "tga_zsr": {
        "optimizer": "sgd",
        "lr": 1e-4,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "attack": {"eps": 1 / 255, "alpha": 1 / 255, "steps": 2},
    },
}
RECIPE_FIELDS = tuple(PUBLISHED_RECIPES["agft"])


class TrainConfig(Section):
    method: Literal[METHODS] = "agft"
    recipe: Literal["shared", "published"] = Field(
        "shared",
        description="shared: every method trains with this section's optimizer, lr, weight decay and "
        "attack; published: each method with its authors' (PUBLISHED_RECIPES), which "
        "replace them",
    )
    optimizer: Literal["sgd", "adamw"] = "sgd"
    pmg_aft: LossWeights = Field(
        LossWeights(alpha=1.0, beta=1.0), description="α: KL to the frozen model on x_adv; β: KL to the student on x"
    )
    tga_zsr: LossWeights = Field(
        LossWeights(alpha=0.08, beta=0.05), description="α: adversarial attention term; β: clean attention term"
    )
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0, description="per worker")
    lr: float = Field(4e-4, gt=0, description="the learning rate at a global batch of lr_batch images")
    lr_batch: int = Field(
        256, gt=0, description="the global batch (batch_size x num_workers) lr is set for: the paper's 2 GPUs x 128"
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="how the lr follows the global batch: none keeps lr; linear multiplies it by global batch "
        "/ lr_batch (SGD's rule), sqrt by that ratio's square root (Adam's)",
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(
        0.2,
        ge=0,
        description="linear warm-up, in epochs, so that it covers the same share "
        "of the run at any global batch (the paper's 1000 iterations "
        "of 256 images: 0.2 of an ImageNet epoch)",
    )
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    amp: Annotated[Literal["off", "bf16", "fp16"], _yaml_false_as_off] = Field(
        "bf16", description="autocast on GPU (fp16 adds a grad scaler); CPU trains in fp32; attacks always fp32"
    )
    max_failures: int = Field(2, ge=0)
    keep_checkpoints: int = Field(2, ge=1, description="the newest checkpoints (encoder + optimizer) kept per run")
    start_timeout_s: float = Field(
        600,
        gt=0,
        description="how long the workers may wait for their resources (e.g. for an autoscaler) before the run fails",
    )
    attack: AttackConfig = AttackConfig()
    validation: ValidationConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _published_recipe(cls, raw: Any) -> Any:
        recipe = (
            isinstance(raw, dict)
            and raw.get("recipe") == "published"
            and PUBLISHED_RECIPES.get(raw.get("method", "agft"))
        )
        return {**raw, **recipe} if recipe else raw

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers

    @property
    def effective_lr(self) -> float:
        """lr scaled from lr_batch to the global batch by lr_scaling."""
        ratio = self.global_batch / self.lr_batch
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[self.lr_scaling]

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.warmup_epochs * steps_per_epoch)

    def recipe_caption(self) -> str:
        if self.recipe == "published":
            return "training: each method at its published recipe (optimizer, lr, weight decay, attack)"
        return (
            f"training: every method at the same recipe ({self.optimizer}, lr {self.lr:g}, weight decay "
            f"{self.weight_decay:g}, PGD-{self.attack.steps} at ε = {255 * self.attack.eps:g}/255)"
        )


class MatrixConfig(Section):
    """`agft eval`: every zero-shot dataset × attack × ε, for the original encoder and each checkpoint."""

    attacks: list[Literal[ATTACKS]] = Field(["pgd"], min_length=1)
    eps: list[PixelBudget] = Field([1 / 255], min_length=1)
    steps: int = Field(20, gt=0, description="iterations of pgd and cw")
    alpha: PixelBudget = Field(1 / 255, description="PGD/CW step at every ε: the paper's 1/255")
    checkpoints: dict[str, str] = Field(
        default_factory=dict, description="name -> fine-tuned image-encoder weights (image_encoder.safetensors)"
    )

    @field_validator("checkpoints")
    @classmethod
    def _original_is_reserved(cls, checkpoints: dict[str, str]) -> dict[str, str]:
        if "original" in checkpoints:
            raise ValueError("'original' is the name of the un-tuned encoder, always evaluated; rename the checkpoint")
        return checkpoints


class EvalConfig(Section):
    batch_size: int = Field(256, gt=0)
    attack: EvalAttack = Field(
        EvalAttack(),
        description="the headline robust accuracy of `agft run` and `compare`; "
        "default the paper's PGD-20, α = ε = 1/255",
    )
    quick: EvalAttack | None = Field(None, description="a cheaper attack reported beside it, labelled as such")
    robust: Literal[ROBUST_DEFINITIONS] = Field(
        "attacked",
        description="attacked: the attacked image is classified "
        "correctly (the paper's); clean_and_attacked: the clean one too",
    )
    matrix: MatrixConfig = MatrixConfig()

    def caption(self) -> str:
        """What every table of `agft run` and `compare` says its robust numbers are."""
        quick = f"; quick: {self.quick.label()}" if self.quick else ""
        return f"robust: {self.attack.label()}{quick}; {ROBUST_MEANING[self.robust]}"


ROBUST_MEANING = {
    "attacked": "an image counts as robust when its attacked version is classified correctly (the paper's count)",
    "clean_and_attacked": "an image counts as robust when its clean and its attacked version are "
    "both classified correctly",
}


class ResourcesConfig(Section):
    """What each Ray task of the DAG asks for (the train workers: train.num_workers, cpus_per_worker, use_gpu)."""

    task_cpus: float = Field(1, gt=0, description="CPUs per text-cache, teacher-cache and eval task")
    task_gpus: float = Field(
        0,
        ge=0,
        description="GPUs per text-cache, teacher-cache and eval task: a fraction "
        "such as 0.25 packs tasks onto one GPU; 0 computes on CPUs",
    )
    loader_workers: int = Field(
        0,
        ge=0,
        description="DataLoader processes decoding images in each task and train "
        "worker (0: decode in the computing process)",
    )
    cpu_fallback: bool = Field(
        False,
        description="GPUs asked for (train.use_gpu, task_gpus) on nodes without CUDA: "
        "false refuses the run before any work; true computes on their CPUs",
    )

    @field_validator("task_gpus")
    @classmethod
    def _whole_above_one(cls, gpus: float) -> float:
        if gpus > 1 and not float(gpus).is_integer():
            raise ValueError(f"{gpus} GPUs: Ray takes a fraction up to 1 or a whole number")
        return gpus


class Domain(Section):
    """One search axis: exactly one of choice, grid, uniform [low, high], loguniform [low, high]. A finite list
    (choice or grid) is tried once per value under random search; optuna samples a choice as a category."""

    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_valid_kind(self) -> Domain:
        kinds = [k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of choice: [..], grid: [..], uniform: [low, high], loguniform: [low, high]"
            )
        bounds = self.uniform or self.loguniform
        if bounds and bounds[0] > bounds[1]:
            raise ValueError(f"low > high in {list(bounds)}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    def extremes(self) -> list[Any]:
        """Values that, if valid, make every value of the axis valid for a bounded field: the ends, and
        for a continuous axis a fractional point inside, which an integer field rejects."""
        if self.choice or self.grid:
            return list(self.choice or self.grid)
        low, high = self.uniform or self.loguniform
        return [low, high] + ([low + 0.37 * (high - low)] if high > low else [])


class CompareConfig(Section):
    """`agft compare`: the original teacher and each method fine-tuned from it, over several seeds."""

    methods: list[Literal[METHODS]] = Field(["tecoa", "agft"], min_length=1)
    # Two seeds keep the default under 20 minutes on a 2-core machine (bench/compare_budget.py); a
    # comparison worth reporting takes more (bench/tuned_compare.py uses three).
    seeds: list[int] = Field([0, 1], min_length=1)
    per_method: dict[Literal[METHODS], dict[str, Any]] = Field(
        default_factory=dict,
        description="fields set for one method's runs only, e.g. each method's tuned values: "
        "{tecoa: {train.lr: 2.0e-4}, agft: {calibration.gamma: 0.7}}",
    )


class SweepConfig(Section):
    space: dict[str, Domain] = {}
    metric: Literal["val_robust_acc", "val_clean_acc", "train_robust_acc", "loss"] = "val_robust_acc"
    mode: Literal["max", "min"] = "max"
    search: Literal["random", "optuna"] = "random"  # grid axes (grid: [..]) are expanded by either
    num_samples: int = Field(
        4,
        gt=0,
        description="samples of the random axes (uniform, loguniform) per combination "
        "of the finite ones (choice, grid)",
    )
    max_concurrent_trials: int | Literal["auto"] = Field(
        "auto", description="auto: as many trials as the cluster holds trainers (train.num_workers workers each)"
    )
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, gt=0, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(2, gt=1)


class Config(Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    data: DataConfig = DataConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cache_dir: str = Field(
        ".agft-cache", description="local path or URI (file://, s3://, gs://...) shared by all nodes"
    )
    storage_path: str | None = Field(None, description="Ray Train/Tune checkpoints; default: under cache_dir")
    artifact_location: str | None = Field(None, description="MLflow artifact root of a new experiment")
    experiment: str = "agft"
    register_models: bool = Field(
        True,
        description="log each fine-tuned CLIP (and its original teacher, once) as "
        "an MLflow model registered under the experiment's name",
    )
    verbose: bool = Field(False, description="Ray's, Ray Train's and Tune's INFO logs on the console (--verbose)")
    teacher_cache_shards: int = Field(2, gt=0)
    resources: ResourcesConfig = ResourcesConfig()
    sweep: SweepConfig = SweepConfig()
    compare: CompareConfig = CompareConfig()

    @field_validator("cache_dir", "storage_path", "artifact_location")
    @classmethod
    def _storable(cls, location: str | None) -> str | None:
        problem = location and check_location(location)
        if problem:
            raise ValueError(problem)
        return location

    @model_validator(mode="after")
    def _method_fits_model(self) -> Config:
        if self.train.method == "tga_zsr" and not has_vit_tower(self.model.arch):
            raise ValueError(
                f"train.method: tga_zsr needs a ViT image tower for its attention maps; "
                f"{self.model.arch} has none (use agft, tecoa, pmg_aft or fare)"
            )
        return self

    @model_validator(mode="after")
    def _per_method_fields_exist(self) -> Config:
        for method, values in self.compare.per_method.items():
            if method not in self.compare.methods:
                raise ValueError(
                    f"compare.per_method.{method}: {method} is not in compare.methods {self.compare.methods}"
                )
            fixed = [k for k in values if self.train.recipe == "published" and _is_recipe_field(k)]
            if fixed:
                raise ValueError(
                    f"compare.per_method.{method}.{fixed[0]}: train.recipe published sets it for each "
                    f"method; use recipe: shared to choose it"
                )
            try:
                with_overrides(self, {"compare.per_method": {}, "train.method": method, **values})
            except (ConfigError, ValidationError) as exc:
                detail = _format(exc) if isinstance(exc, ValidationError) else str(exc)
                raise ValueError(f"compare.per_method.{method}: {detail}") from None
        return self

    def run_params(self) -> dict:
        """What an MLflow run logs as its params: every field, and the global batch and the lr it trains at."""
        params = self.model_dump(mode="json")
        params["train"] |= {"global_batch": self.train.global_batch, "effective_lr": self.train.effective_lr}
        return params

    def max_epochs(self) -> int:
        """The most epochs any sweep trial trains: train.epochs, or the largest value of its axis."""
        axis = self.sweep.space.get("train.epochs")
        return int(max(axis.extremes())) if axis else self.train.epochs

    @model_validator(mode="after")
    def _sweep_fields_exist(self) -> Config:
        if self.sweep.search == "optuna" and any(d.grid for d in self.sweep.space.values()):
            raise ValueError("sweep.search optuna cannot expand grid axes; use choice instead")
        if self.sweep.scheduler == "asha" and self.sweep.grace_period > self.max_epochs():
            raise ValueError(
                f"sweep.grace_period: {self.sweep.grace_period} epochs is more than the "
                f"{self.max_epochs()} a trial trains, so ASHA could never stop one; lower it or "
                f"use scheduler: fifo"
            )
        base = self.model_dump(mode="json")
        base["sweep"]["space"] = {}
        for key, domain in self.sweep.space.items():
            if self.train.recipe == "published" and _is_recipe_field(key):
                raise ValueError(
                    f"sweep.space.{key}: train.recipe published sets it for each method; use "
                    f"recipe: shared to search it"
                )
            for value in domain.extremes():
                raw = copy.deepcopy(base)
                try:
                    _set_path(raw, key, value)
                    Config.model_validate(raw)
                except (ConfigError, ValidationError) as exc:
                    detail = _format(exc) if isinstance(exc, ValidationError) else str(exc)
                    raise ValueError(f"sweep.space.{key}: value {value!r} is not valid here ({detail})") from None
        return self


def _is_recipe_field(key: str) -> bool:
    return key.split(".")[:2] in [["train", field] for field in RECIPE_FIELDS]


def _format(exc: ValidationError) -> str:
    def one(error) -> str:
        where, msg = ".".join(str(p) for p in error["loc"]), error["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" if where else msg

    return "; ".join(one(e) for e in exc.errors())


def _set_path(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = value


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. train.epochs=2")
    _set_path(raw, key, yaml.safe_load(value))


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of cfg with dotted fields replaced, e.g. {"calibration.gamma": 0.5}."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        _set_path(raw, key, value)
    return Config.model_validate(raw)


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
        raise ConfigError(f"config {path}: {_format(exc)}") from exc


def preflight(cfg: Config) -> None:
    """Checks against the file system, run where the data is (a Ray task): roots and weights must exist."""
    from agft_core.model import cached_pretrained, missing_pretrained_message

    validation = [("train.validation.dataset", cfg.train.validation.dataset)] if cfg.train.validation else []
    for where, dataset in [("data.train", cfg.data.train), *validation] + [
        (f"data.zero_shot.{i}", d) for i, d in enumerate(cfg.data.zero_shot)
    ]:
        problem = catalog.check_root(dataset.spec(cfg.data.world_seed))
        if problem:
            raise ConfigError(f"{where}: {problem}")
    for name, path in cfg.eval.matrix.checkpoints.items():
        if not Path(path).is_file():
            raise ConfigError(f"eval.matrix.checkpoints.{name}: weights file {path} does not exist")
    model = cfg.model
    if model.weights_file and not Path(model.weights_file).is_file():
        raise ConfigError(f"model.weights: weights file {model.weights_file} does not exist")
    if (
        model.weights not in ("embedded", "random")
        and not model.weights_file
        and cached_pretrained(model.arch, model.weights) is None
    ):
        raise ConfigError(f"model.weights: {missing_pretrained_message(model.arch, model.weights)}")


def check_sweep(cfg: Config) -> None:
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; add axes such as calibration.gamma: {choice: [0.2, 0.4, 0.7]}")
    if cfg.sweep.metric.startswith("val_") and cfg.train.validation is None:
        raise ConfigError(
            f"train.validation: required for sweep.metric {cfg.sweep.metric}; "
            "set a held-out dataset, e.g. {dataset: {name: colours, split: train, limit: 256}}"
        )


def on_cluster(address: str | None) -> bool:
    """Whether the driver attaches to a running cluster (--address, or RAY_ADDRESS as `ray job submit`
    sets it) rather than starting its own local Ray."""
    return (address or os.environ.get("RAY_ADDRESS") or "local") != "local"


def tracking_uri(flag: str | None, cluster: bool = False) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    A relative SQLite path is made absolute: Ray workers run in other directories. On a cluster it
    is refused: it names a file on one node (under `ray job submit`, in the job's package directory,
    which Ray deletes), and a rank-0 worker on another node would write its own empty store.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        if cluster:
            raise ConfigError(
                f"--tracking-uri: {uri} is a file relative to the driver, which on a cluster is one "
                f"node's disk; use a tracking server (http://host:5000) or an absolute sqlite:////path "
                f"on storage every node mounts"
            )
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


PROBE_TIMEOUT_S = 5


def check_tracking(uri: str) -> None:
    """Before any work: a tracking server that does not answer, or refuses our credentials, would
    otherwise fail the run only after MLflow's retries (minutes), or after training."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise ConfigError(f"--tracking-uri: {uri}: folder {folder} does not exist")
        return
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    auth = (
        (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        if os.environ.get("MLFLOW_TRACKING_USERNAME")
        else None
    )
    try:
        reply = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "Default"},
            auth=auth,
            timeout=PROBE_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        raise ConfigError(
            f"--tracking-uri: no tracking server answers at {uri} ({type(exc).__name__}); start it, "
            f"or pass the URI of one that runs"
        ) from None
    if reply.status_code in (401, 403):
        raise ConfigError(
            f"--tracking-uri: {uri} refused the credentials (HTTP {reply.status_code}); set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if reply.status_code >= 500:
        raise ConfigError(f"--tracking-uri: {uri} answered HTTP {reply.status_code}; is it an MLflow server?")


def check_ray_address(address: str | None) -> None:
    """Before any work: ray.init on an address where nothing listens retries for a long while."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # local, auto, or none: Ray finds or starts its cluster
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"--address: no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}); "
            f"start one (ray start --head) or pass the head's GCS address, host:6379"
        ) from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
