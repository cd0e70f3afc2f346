"""What eval.precision changes: robust and clean accuracy of the demo's fine-tuned encoder (and, with --original,
its teacher) on every zero-shot task under the headline attack and the quick one, and the time each takes, for each
number format, on the same images with the same random starts. fp32 is the reference every other format is compared
with.

Usage: .venv/bin/python bench/eval_precision.py --cache-dir .agft-cache [--device cuda] [--limit 500]
       [--out bench/results/eval_precision_cpu.json]
The cache must hold a finished `agft run` of configs/demo.yaml (its teacher and fine-tune are read, not rebuilt).
On a CPU, tf32 is fp32 and is left out; fp16 autocast on a CPU is measured but is not what a GPU does.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from demo_models import demo_models, result_row

from agft_core.datasets import load_dataset
from agft_core.evaluate import zero_shot_accuracy
from agft_core.model import class_text_embeddings, logit_scale
from pipeline.config.loading import load_config

PRECISIONS = {"cpu": ["fp32", "bf16", "fp16"], "cuda": ["fp32", "tf32", "bf16", "fp16"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=list(PRECISIONS))
    parser.add_argument("--limit", type=int, default=500, help="test images per task (the same for every format)")
    parser.add_argument("--original", action="store_true", help="also the teacher (its robust accuracy is near 0)")
    parser.add_argument("--out", default=None, help="default bench/results/eval_precision_<device>.json")
    args = parser.parse_args()
    cfg = load_config(None)
    device = torch.device(args.device)
    clip, encoders = demo_models(args.cache_dir, cfg.model.arch, args.original)
    attacks = {"headline": cfg.eval.attack, "quick": cfg.eval.quick}
    rows = []
    for dataset in cfg.data.zero_shot:
        data = load_dataset(dataset.model_copy(update={"limit": args.limit}).spec(cfg.data.world_seed), 32)
        text = class_text_embeddings(clip, cfg.model.arch, data.classnames, data.templates)
        for model, encoder in encoders.items():
            for role, attack in attacks.items():
                name, eps, alpha, steps, restarts = attack.as_tuple()
                for precision in PRECISIONS[args.device]:
                    start = time.perf_counter()
                    scores = zero_shot_accuracy(
                        encoder.to(device),
                        text,
                        logit_scale(clip),
                        data.images,
                        eps=eps,
                        alpha=alpha or 0.0,
                        steps=steps or 0,
                        restarts=restarts or 1,
                        attack=name,
                        batch_size=cfg.eval.batch_size,
                        device=device,
                        generator=torch.Generator(device).manual_seed(cfg.seed),
                        precision=precision,
                    )
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    rows.append(result_row(data.name, model, role, scores, start, precision=precision))
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": _device_name(device)},
        "command": f"bench/eval_precision.py --device {args.device} --limit {args.limit}"
        + (" --original" if args.original else ""),
        "attacks": {role: attack.label() for role, attack in attacks.items()},
        "summary": _summary(rows),
        "rows": rows,
    }
    out = Path(args.out or f"bench/results/eval_precision_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")


def _summary(rows: list[dict]) -> dict:
    """For each (model, attack, format): mean accuracies, the largest change from fp32 on any task, in points, and
    the time against fp32's."""
    reference = {(r["dataset"], r["model"], r["attack"]): r for r in rows if r["precision"] == "fp32"}
    summary = {}
    for model, attack, precision in dict.fromkeys((r["model"], r["attack"], r["precision"]) for r in rows):
        cell = [r for r in rows if (r["model"], r["attack"], r["precision"]) == (model, attack, precision)]
        fp32 = [reference[r["dataset"], model, attack] for r in cell]
        summary[f"{model} {attack} {precision}"] = {
            "mean_clean": round(100 * sum(r["clean"] for r in cell) / len(cell), 2),
            "mean_attacked": round(100 * sum(r["attacked"] for r in cell) / len(cell), 2),
            "largest_change_points": {
                kind: round(100 * max(abs(r[kind] - f[kind]) for r, f in zip(cell, fp32)), 2)
                for kind in ("clean", "attacked")
            },
            "seconds": round(sum(r["seconds"] for r in cell), 1),
            "time_vs_fp32": round(sum(r["seconds"] for r in cell) / sum(f["seconds"] for f in fp32), 3),
        }
    return summary


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


if __name__ == "__main__":
    main()
