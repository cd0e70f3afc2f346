"""Has the headline attack converged? Robust accuracy of the demo's teacher and fine-tuned encoder on every
zero-shot task under PGD (the quick view) and APGD-CE at growing budgets, against a reference of APGD-CE
with 100 iterations and 2 restarts. The headline attack is the cheapest one within 0.5 point of the
reference on every task.

Usage: .venv/bin/python bench/attack_convergence.py --cache-dir .agft-cache [--original]
       [--out bench/results/attack_convergence.json]
The cache must hold a finished `agft run` of configs/demo.yaml (its teacher and fine-tune are read, not rebuilt).
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

ATTACKS = {  # name -> (attack, α in /255, steps, restarts)
    "pgd-10 (quick)": ("pgd", 0.5, 10, 1),
    "apgd-ce-20": ("apgd-ce", None, 20, 1),
    "apgd-ce-20x2": ("apgd-ce", None, 20, 2),
    "apgd-ce-100x2 (reference)": ("apgd-ce", None, 100, 2),
}
REFERENCE = "apgd-ce-100x2 (reference)"
TOLERANCE = 0.005


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", default="bench/results/attack_convergence.json")
    parser.add_argument("--limit", type=int, default=1000, help="test images per task (the same ones for every attack)")
    parser.add_argument("--original", action="store_true", help="also the teacher (its robust accuracy is near 0)")
    args = parser.parse_args()
    cfg = load_config(None)
    eps = cfg.eval.attack.eps
    clip, encoders = demo_models(args.cache_dir, cfg.model.arch, args.original)
    rows = []
    for dataset in cfg.data.zero_shot:
        data = load_dataset(dataset.model_copy(update={"limit": args.limit}).spec(cfg.data.world_seed), 32)
        text = class_text_embeddings(clip, cfg.model.arch, data.classnames, data.templates)
        for model, encoder in encoders.items():
            for label, (attack, alpha255, steps, restarts) in ATTACKS.items():
                start = time.perf_counter()
                scores = zero_shot_accuracy(
                    encoder,
                    text,
                    logit_scale(clip),
                    data.images,
                    eps=eps,
                    alpha=(alpha255 or 0) / 255,
                    steps=steps,
                    batch_size=cfg.eval.batch_size,
                    generator=torch.Generator().manual_seed(0),
                    attack=attack,
                    restarts=restarts,
                )
                rows.append(result_row(data.name, model, label, scores, start))
    reference = {(r["dataset"], r["model"]): r["attacked"] for r in rows if r["attack"] == REFERENCE}
    gaps = {
        label: max(r["attacked"] - reference[r["dataset"], r["model"]] for r in rows if r["attack"] == label)
        for label in ATTACKS
    }
    seconds = {label: sum(r["seconds"] for r in rows if r["attack"] == label) for label in ATTACKS}
    converged = [label for label in ATTACKS if label != REFERENCE and gaps[label] <= TOLERANCE]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": f"bench/attack_convergence.py --limit {args.limit}" + (" --original" if args.original else ""),
        "eps": eps,
        "tolerance": TOLERANCE,
        "reference": REFERENCE,
        "largest_gap_to_reference": gaps,
        "seconds": seconds,
        "cheapest_converged": min(converged, key=seconds.get) if converged else None,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("largest_gap_to_reference", "seconds", "cheapest_converged")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
