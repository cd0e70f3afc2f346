"""The config's leaf sections: model, pretraining, data, calibration, attacks, evaluation and resources.
The sections that combine them (train, sweep, compare, the whole Config) are in schema.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from agft_core import catalog, world
from agft_core.catalog import (
    ATTACKS,
    EMBEDDED_ARCH,
    PRECISIONS,
    ROBUST_DEFINITIONS,
    architectures,
    attack_key,
    is_weights_file,
)
from agft_core.errors import InputError


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
off_for_false = BeforeValidator(lambda value: "off" if value is False else value)


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
        if catalog.missing_transformers(arch):
            raise ValueError(
                f"{arch}'s text tower or tokenizer comes from Hugging Face transformers, which is not installed: "
                "pip install transformers, or choose another architecture"
            )
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
    amp: Annotated[Literal["auto", "off", "bf16"], off_for_false] = Field(
        "auto",
        description="autocast of the towers (pretraining runs on the CPU): auto is bf16 where the CPU of the "
        "machine that starts the run has native bf16 (avx512_bf16 or AMX), off (fp32) elsewhere, where bf16 is "
        "emulated and 12x slower",
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
        "error",
        description="images that fail to decode: stop naming the file, or leave them out (found once per run, the "
        "first named in the console)",
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
    decode: Literal["loader", "ray_data"] = Field(
        "loader",
        description="who decodes the training images, for the teacher cache and for training: loader, the process "
        "that computes on them (the teacher-cache task, each train worker), with resources.loader_workers DataLoader "
        "processes; ray_data, Ray Data actors of resources.decode_cpus on any node's CPUs, streaming them to the "
        "model actors and the train workers",
    )
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
    shard_size: int = Field(
        1000,
        gt=0,
        description="images per unit of evaluation: each (dataset, model, attack) cell is split into shards this "
        "size, scheduled over every task slot and cached as each finishes",
    )
    retries: int = Field(2, ge=0, description="times a failed shard is retried before its cell is marked incomplete")
    precision: Literal[PRECISIONS] = Field(
        "fp32",
        description="the number format the encoder is attacked and scored in: fp32 (TF32 off, what every reported "
        "number used), tf32 (CUDA only; fp32 on a CPU), bf16 or fp16 (autocast); docs/evaluation.md has what "
        "each changes",
    )
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
        precision = f"; attacked in {self.precision}" if self.precision != "fp32" else ""
        return f"robust: {self.attack.label()}{quick}{precision}; {ROBUST_MEANING[self.robust]}"


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
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0,
        description="DataLoader processes decoding images in each task and train worker (0: decode in the "
        "computing process); auto: one per CPU it asks for beyond the first (task_cpus, train.cpus_per_worker)",
    )
    decode_cpus: float = Field(1, gt=0, description="CPUs per Ray Data decode actor (data.decode: ray_data)")
    cpu_fallback: bool = Field(
        False,
        description="GPUs asked for (train.use_gpu, task_gpus) on nodes without CUDA: "
        "false refuses the run before any work; true computes on their CPUs",
    )

    def loader_processes(self, cpus: float) -> int:
        """loader_workers for a process that asks Ray for `cpus` CPUs."""
        return max(0, int(cpus) - 1) if self.loader_workers == "auto" else self.loader_workers

    @field_validator("task_gpus")
    @classmethod
    def _one_gpu_at_most(cls, gpus: float) -> float:
        if gpus > 1:  # the task computes on the first GPU Ray gives it: more would sit idle
            raise ValueError(f"{gpus} GPUs: a task computes on one GPU; give at most 1 (a fraction packs tasks)")
        return gpus
