"""Throughput of one AGFT training step against the reference-structured step, and its MFU.

Usage on a GPU (the paper's model at 224 px, random init, nothing downloaded):
    .venv/bin/python bench/gpu_step.py --arch ViT-B-32 --batch 128 --amp bf16 [--compile]
On a CPU, the tiny model:
    .venv/bin/python bench/gpu_step.py --arch agft-tiny-vit --batch 128 --classes 8 --amp bf16 --compile

Three steps on the same model, data and machine, in one process:
- "reference": the official loop's structure: the frozen teacher's forward pass on every batch, fp32
  throughout, no cache;
- "ours": the teacher's embeddings gathered from the cache (a tensor, as the pipeline loads it from
  Parquet), fp32 PGD, then the student update under --amp, as the training loop runs it;
- "ours_compiled" (with --compile): the same with the student under torch.compile (compile time excluded).
FLOPs are counted over one step with torch's per-op formulas; MFU is achieved FLOP/s over the bf16 matmul
rate measured on the same device.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from agft_core.methods import adversarial_step, build_method
from agft_core.model import ImageEncoder, create_clip, logit_scale, preprocess_cfg
from pipeline.config.sections import AttackConfig


class FlopCount(TorchDispatchMode):
    """Counts matmul/conv/attention FLOPs with torch's own formulas. torch's FlopCounterMode also
    tracks modules with backward hooks, which break autograd.grad, the call PGD is built on."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="bf16")
    parser.add_argument("--pgd-steps", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the step with the student compiled")
    parser.add_argument("--out", default="bench/results/gpu_step.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    clip = create_clip(args.arch, None)  # random init: throughput does not depend on the weights
    size, scale = preprocess_cfg(clip)["size"][0], logit_scale(clip)
    student = ImageEncoder.from_clip(clip).to(device).train()
    teacher = ImageEncoder.from_clip(create_clip(args.arch, None)).to(device).eval().requires_grad_(False)
    dim = student(torch.rand(1, 3, size, size, device=device)).shape[-1]
    text = F.normalize(torch.randn(args.classes, dim, device=device), dim=-1)
    cache = F.normalize(torch.randn(args.batch * 4, dim, device=device), dim=-1)
    attack = AttackConfig(eps=1 / 255, alpha=1 / 255, steps=args.pgd_steps)
    method = build_method("agft", text, scale, gamma=0.4, inv_tau=180.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda")
    x = torch.rand(args.batch, 3, size, size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    index = torch.randperm(len(cache), device=device)[: args.batch]

    def reference() -> None:
        with torch.no_grad():
            target = teacher(x)
        adversarial_step(
            student,
            student,
            method,
            x,
            y,
            cached_teacher=target,
            attack=attack,
            amp="off",
            optimizer=optimizer,
            scaler=scaler,
        )

    def ours(model) -> Callable[[], None]:
        return lambda: adversarial_step(
            model,
            model,
            method,
            x,
            y,
            cached_teacher=cache[index],
            attack=attack,
            amp=args.amp,
            optimizer=optimizer,
            scaler=scaler,
        )

    steps = {"reference": reference, "ours": ours(student)}
    if args.compile:
        steps["ours_compiled"] = ours(torch.compile(student))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "arch": args.arch,
        "image_size": size,
        "batch": args.batch,
        "amp": args.amp,
        "pgd_steps": args.pgd_steps,
        "steps_timed": args.steps,
    }
    peak = {
        "bf16": matmul_tflops(device, torch.bfloat16, 8192 if device.type == "cuda" else 1024, 20),
        "fp32": matmul_tflops(device, torch.float32, 8192 if device.type == "cuda" else 1024, 20),
    }
    report["matmul_tflops"] = {k: round(v, 2) for k, v in peak.items()}
    for name, step in steps.items():
        for _ in range(args.warmup):  # compiles a compiled step
            step()
        with FlopCount() as counter:
            step()
        flops = counter.total
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        report[name] = {
            "images_per_s": round(args.batch / seconds, 1),
            "step_ms": round(1000 * seconds, 2),
            "gflop_per_step": round(flops / 1e9, 1),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None,
            "mfu_vs_bf16_matmul": round(flops / seconds / (peak["bf16"] * 1e12), 4),
            "speedup_vs_reference": round(report["reference"]["step_ms"] / (1000 * seconds), 3)
            if name != "reference"
            else 1.0,
        }
        print(name, report[name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
