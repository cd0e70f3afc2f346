"""How many directions of the image embedding a fine-tuning task's class prompts span: the effective rank (Roy &
Vetterli 2007: the exponential of the entropy of the normalised singular values) and the numerical rank of the
teacher's text matrix [classes, dim], as the losses use it (L2-normalised rows). AGFT's soft target over the training
classes moves the student's embedding only along that span; FARE matches the whole embedding.

Usage: .venv/bin/python bench/text_rank.py --cache-dir .agft-cache [--out bench/results/text_rank.json]
The cache must hold the demo's pretrained teacher (a finished `agft run` of configs/demo.yaml, or its pretrain step).
"""

import argparse
import json
import platform
from pathlib import Path

import torch
from demo_models import newest

from agft_core import world
from agft_core.model import class_text_embeddings, create_clip
from agft_core.pretrain import VERSION as PRETRAIN_VERSION
from pipeline.config.loading import load_config


def effective_rank(matrix: torch.Tensor) -> float:
    singular = torch.linalg.svdvals(matrix.double())
    p = singular / singular.sum()
    return float(torch.exp(-(p * p.log()).nansum()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", default="bench/results/text_rank.json")
    args = parser.parse_args()
    cfg = load_config(None)
    teacher = newest(f"{args.cache_dir}/pretrain/*/attempt-*/clip.safetensors")
    clip = create_clip(cfg.model.arch, teacher)
    rows = []
    for name, task in world.TASKS.items():
        text = class_text_embeddings(clip, cfg.model.arch, list(task.classnames), [task.template])
        row = {
            "task": name,
            "classes": len(task.classnames),
            "dim": text.shape[1],
            "effective_rank": round(effective_rank(text), 2),
            "numerical_rank": int(torch.linalg.matrix_rank(text.double())),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    entry = teacher[teacher.index("pretrain/") :]
    result = {"teacher": f"{PRETRAIN_VERSION} ({entry})", "machine": platform.machine(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
