"""The config's schema: the train, sweep and compare sections and the whole Config, which check their fields
against each other; with_overrides, the one way to change a field of a validated config."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from agft_core.catalog import METHOD_SPECS, METHODS, RECIPE_FIELDS, check_location, has_vit_tower
from pipeline.config.sections import (
    AttackConfig,
    CalibrationConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PretrainConfig,
    ResourcesConfig,
    Section,
    ValidationConfig,
    off_for_false,
)


class LossWeights(Section):
    alpha: float = Field(ge=0)
    beta: float = Field(ge=0)


class _TrainFields(Section):
    method: Literal[METHODS] = "agft"
    recipe: Literal["shared", "published"] = Field(
        "shared",
        description="shared: every method trains with this section's optimizer, lr, weight decay and "
        "attack; published: each method with its authors' (agft_core.catalog.METHOD_SPECS), which "
        "replace them",
    )
    optimizer: Literal["sgd", "adamw"] = "sgd"
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
    num_workers: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        2,
        description="the trainer's workers; auto: one per GPU the cluster holds (train.use_gpu), its autoscaler's "
        "maximum included, found once Ray is up",
    )
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    amp: Annotated[Literal["off", "bf16", "fp16"], off_for_false] = Field(
        "bf16", description="autocast on GPU (fp16 adds a grad scaler); CPU trains in fp32; attacks always fp32"
    )
    grad_compression: Annotated[Literal["off", "bf16"], off_for_false] = Field(
        "off",
        description="bf16: DDP all-reduces the gradients in bf16 (half of fp32's bytes; a comm hook), off: in "
        "fp32. Off until a GPU measurement says what it changes",
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
            and METHOD_SPECS[raw.get("method", "agft")].published
        )
        return {**raw, **recipe} if recipe else raw

    @model_validator(mode="after")
    def _auto_counts_gpus(self) -> TrainConfig:
        if self.num_workers == "auto" and not self.use_gpu:
            raise ValueError("num_workers: auto counts the cluster's GPUs; with use_gpu=false give a number")
        return self

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


# train.<method>: the loss weights of each method that has them, one field per METHOD_SPECS row
TrainConfig = create_model(
    "TrainConfig",
    __base__=_TrainFields,
    __doc__="The fine-tune: method, recipe, budget, workers, and each weighted method's α and β.",
    **{
        name: (
            LossWeights,
            Field(LossWeights(alpha=spec.loss_weights[0], beta=spec.loss_weights[1]), description=spec.weights_meaning),
        )
        for name, spec in METHOD_SPECS.items()
        if spec.loss_weights
    },
)


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

    @field_validator("methods", "seeds")
    @classmethod
    def _each_once(cls, values: list) -> list:
        """A repeat would run again from the cache and count once in the table, whose caption counts it twice."""
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ValueError(f"each at most once; repeated: {', '.join(map(str, repeated))}")
        return values


class SweepConfig(Section):
    space: dict[str, Domain] = {}
    metric: Literal["val_robust_acc", "val_clean_acc", "train_robust_acc", "loss"] = "val_robust_acc"
    mode: Literal["max", "min"] = Field("max", description="set from the metric: min for the loss, max for accuracies")
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

    @model_validator(mode="before")
    @classmethod
    def _mode_of_the_metric(cls, raw: Any) -> Any:
        """The mode the metric improves in: min for the loss, max for an accuracy. A config that says the other is
        refused: ASHA would stop the best trials and the sweep pick the worst."""
        if not isinstance(raw, dict):
            return raw
        metric = raw.get("metric", "val_robust_acc")
        improves = "min" if metric == "loss" else "max"
        if raw.get("mode", improves) != improves:
            raise ValueError(
                f"mode {raw['mode']} would pick the worst trial by {metric}; leave it out or set {improves}"
            )
        return {**raw, "mode": improves}


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
    system_metrics_interval: float | None = Field(
        10.0,
        ge=1,
        description="seconds between samples of each training node's CPU, memory, disk, network and GPU use, "
        "logged to the run as system/node<N>/... (null: none)",
    )
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
        if METHOD_SPECS[self.train.method].needs_vit and not has_vit_tower(self.model.arch):
            others = [name for name, spec in METHOD_SPECS.items() if not spec.needs_vit]
            raise ValueError(
                f"train.method: {self.train.method} needs a ViT image tower for its attention maps; "
                f"{self.model.arch} has none (use {', '.join(others)})"
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
                detail = describe_errors(exc) if isinstance(exc, ValidationError) else str(exc)
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
            if any(key == field or key.startswith(f"{field}.") for field in DATASET_FIELDS):
                raise ValueError(
                    f"sweep.space.{key}: every trial trains and validates on the datasets the sweep describes "
                    f"and caches once; run one sweep per dataset instead"
                )
            if self.train.recipe == "published" and _is_recipe_field(key):
                raise ValueError(
                    f"sweep.space.{key}: train.recipe published sets it for each method; use "
                    f"recipe: shared to search it"
                )
            for value in domain.extremes():
                raw = copy.deepcopy(base)
                try:
                    set_dotted(raw, key, value)
                    Config.model_validate(raw)
                except (ConfigError, ValidationError) as exc:
                    detail = describe_errors(exc) if isinstance(exc, ValidationError) else str(exc)
                    raise ValueError(f"sweep.space.{key}: value {value!r} is not valid here ({detail})") from None
        return self


# Which images a run reads: decided once per sweep, before its trials (stages.describe, the caches)
DATASET_FIELDS = ("data.train", "data.zero_shot", "data.world_seed", "train.validation")


def _is_recipe_field(key: str) -> bool:
    return key.split(".")[:2] in [["train", field] for field in RECIPE_FIELDS]


def describe_errors(exc: ValidationError) -> str:
    def one(error) -> str:
        where, msg = ".".join(str(p) for p in error["loc"]), error["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" if where else msg

    return "; ".join(one(e) for e in exc.errors())


def set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = value


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of cfg with dotted fields replaced, e.g. {"calibration.gamma": 0.5}."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(raw, key, value)
    return Config.model_validate(raw)
