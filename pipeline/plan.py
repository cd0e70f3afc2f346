"""`agft plan`: what `agft run` of a config costs, before it is spent. Each stage's work (images, forward passes
per image, FLOPs), the GPU-hours and wall time that FLOPs predict at a stated peak and MFU on a stated number of
GPUs, and whether the GPUs or the CPUs decoding images bound each stage. Nothing is measured here: the model's
FLOPs per image are counted on a random-init copy (torch's FlopCounterMode), the datasets' sizes come from their
`limit` or the published split sizes, and every assumption is printed with the table."""

from __future__ import annotations

from dataclasses import dataclass

from agft_core.attacks import forward_passes
from agft_core.catalog import EMBEDDED_COUNTS, METHOD_SPECS, DatasetSpec
from pipeline.config.schema import Config
from pipeline.config.sections import ConfigError

# Published sizes of the splits the paper evaluates on (torchvision's counts), for a plan made where the data is not
SPLIT_SIZES = {
    ("imagenet", "train"): 1_281_167,
    ("imagenet", "val"): 50_000,
    ("caltech101", "all"): 8_677,
    ("caltech256", "all"): 30_607,
    ("cifar10", "train"): 50_000,
    ("cifar10", "test"): 10_000,
    ("cifar100", "train"): 50_000,
    ("cifar100", "test"): 10_000,
    ("dtd", "test"): 1_880,
    ("eurosat", "all"): 27_000,
    ("aircraft", "test"): 3_333,
    ("flowers102", "test"): 6_149,
    ("food101", "test"): 25_250,
    ("pets", "test"): 3_669,
    ("pcam", "test"): 32_768,
    ("cars", "test"): 8_041,
    ("stl10", "test"): 8_000,
    ("sun397", "all"): 108_754,
}
GRADIENT_PASS = 3  # a forward and its backward, in forward passes


@dataclass(frozen=True)
class Assumptions:
    gpus: int
    peak_tflops: float  # per GPU, at the training precision (an H100 SXM: 989 dense bf16)
    mfu: float  # the share of the peak the model reaches
    cpus_per_gpu: float  # decoding images
    decode_rate: float  # images one CPU decodes and resizes per second


@dataclass(frozen=True)
class Stage:
    name: str
    images: int  # images through the model, counting each epoch and each model
    passes: float  # forward passes per image
    decoded: int  # images decoded from disk

    def flops(self, forward_flops: float) -> float:
        return self.images * self.passes * forward_flops


def size(spec: DatasetSpec, field: str) -> int:
    """A dataset's images: its limit, or its split's size."""
    full = EMBEDDED_COUNTS[spec.split] if spec.kind == "embedded" else SPLIT_SIZES.get((spec.kind, spec.split))
    if full is None:
        if spec.limit is None:
            raise ConfigError(f"{field}: the size of a {spec.kind} {spec.split} split is unknown here; give it a limit")
        return spec.limit
    return min(full, spec.limit) if spec.limit else full


def stages(cfg: Config) -> list[Stage]:
    """The work of `agft run` on this config, stage by stage."""
    method = METHOD_SPECS[cfg.train.method]
    train = size(cfg.data.train.spec(cfg.data.world_seed), "data.train")
    epochs = cfg.train.epochs
    out = []
    if method.teacher_cache or cfg.calibration.gamma == "auto":
        out.append(Stage("teacher cache", train, 1, train))
    # per image and step: the training attack's gradient steps, the student's forward and backward, and the
    # frozen teacher's forward for the methods that run it
    per_step = GRADIENT_PASS * (cfg.train.attack.steps + 1) + method.frozen_encoder
    out.append(Stage("train", epochs * train, per_step, epochs * train))
    if cfg.train.validation:
        held_out = size(cfg.train.validation.dataset.spec(cfg.data.world_seed), "train.validation.dataset")
        passes = forward_passes("pgd", cfg.train.validation.attack.steps)
        out.append(Stage("validation", epochs * held_out, passes, epochs * held_out))
    attacks = [a for a in (cfg.eval.attack, cfg.eval.quick) if a]
    zero_shot = sum(size(d.spec(cfg.data.world_seed), f"data.zero_shot.{d.name}") for d in cfg.data.zero_shot)
    models = 2  # the original teacher and the fine-tuned encoder
    passes = sum(forward_passes(a.name, a.steps, a.restarts) for a in attacks)
    out.append(Stage("eval", models * zero_shot, passes, models * len(attacks) * zero_shot))
    return out


def forward_flops(cfg: Config) -> float:
    """FLOPs of one image through the image tower at its input size, counted on a random-init copy."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from agft_core.model import ImageEncoder, create_clip, input_size

    clip = create_clip(cfg.model.arch, None)
    encoder = ImageEncoder.from_clip(clip).eval()
    # with gradients on: under no_grad, attention takes a fused kernel whose projections the counter misses
    with FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, 3, input_size(cfg.model.arch), input_size(cfg.model.arch)))
    return float(counter.get_total_flops())


def table(cfg: Config, flops_per_image: float, given: Assumptions) -> list[dict]:
    """One row per stage and a total: work, GPU-hours and wall hours, and what bounds the stage."""
    rows = []
    for stage in stages(cfg):
        flops = stage.flops(flops_per_image)
        gpu_s = flops / (given.peak_tflops * 1e12 * given.mfu)
        decode_s = stage.decoded / (given.cpus_per_gpu * given.decode_rate)  # per GPU's share of the CPUs
        wall_s = max(gpu_s, decode_s) / given.gpus
        rows.append(
            {
                "stage": stage.name,
                "images": stage.images,
                "passes/image": stage.passes,
                "PFLOP": flops / 1e15,
                "GPU-hours": gpu_s / 3600,
                "wall hours": wall_s / 3600,
                "bound by": "GPU" if gpu_s >= decode_s else "CPU decoding",
            }
        )
    total = {"stage": "total", "images": "", "passes/image": ""}
    total |= {k: sum(r[k] for r in rows) for k in ("PFLOP", "GPU-hours", "wall hours")}
    return rows + [total | {"bound by": ""}]
