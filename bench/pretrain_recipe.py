"""The embedded teacher's pretraining recipe: wall time against the teacher's zero-shot clean accuracy.

Each variant pretrains the teacher in this process (as the pretrain Ray task does, on all the CPUs) and
scores it, clean, on the demo config's zero-shot suite (test splits). A cheaper recipe is acceptable when
no suite dataset loses more than 1 point against the reference variant (issue 13).

Usage: .venv/bin/python bench/pretrain_recipe.py [--variants ref,6ep,...] [--today TEACHER.safetensors]
                                                  [--out bench/results/pretrain_recipe.json]
--today scores a teacher that an earlier commit pretrained (its pretrain cache file), as "today".
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from agft_core import world
from agft_core.datasets import load_dataset
from agft_core.evaluate import embed_images
from agft_core.model import ImageEncoder, class_text_embeddings, create_clip, preprocess_cfg
from agft_core.pretrain import pretrain_clip, resolve_amp
from pipeline.cli import with_config
from pipeline.config.loading import load_config

# name: the pretrain arguments it changes from configs/demo.yaml's
VARIANTS = {
    "ref": {},
    "fp32": {"amp": "off"},
    "8ep": {"epochs": 8},
    "7ep": {"epochs": 7},
    "7ep-lr4e-3": {"epochs": 7, "lr": 4e-3},
    "6ep": {"epochs": 6},
    "5ep-b512": {"epochs": 5, "batch_size": 512, "lr": 3e-3},
}


def clean_accuracy(model, cfg) -> dict[str, float]:
    size = preprocess_cfg(model)["size"][0]
    encoder = ImageEncoder.from_clip(model).eval()
    scores = {}
    for dataset in cfg.data.zero_shot:
        data = load_dataset(dataset.spec(cfg.data.world_seed), size)
        text = class_text_embeddings(model, cfg.model.arch, data.classnames, data.templates)
        labels, emb = embed_images(encoder, data.images, range(len(data.images)), cfg.eval.batch_size)
        scores[dataset.name] = round(100 * ((emb @ text.T).argmax(-1) == labels).float().mean().item(), 2)
    scores["mean"] = round(sum(scores.values()) / len(scores), 2)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--today", help="a teacher's weights file, pretrained by the commit before the change")
    parser.add_argument("--out", default="bench/results/pretrain_recipe.json")
    args = with_config(parser).parse_args()  # e.g. --set pretrain.corpus_size=512 to check the script
    torch.set_num_threads(os.cpu_count())
    cfg = load_config(args.config, args.overrides)
    base = {
        "epochs": cfg.pretrain.epochs,
        "batch_size": cfg.pretrain.batch_size,
        "lr": cfg.pretrain.lr,
        "amp": resolve_amp(cfg.pretrain.amp),  # the JSON says which precision ran
    }
    corpus = world.generate("corpus", "pretrain", cfg.pretrain.corpus_size, cfg.data.world_seed)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "base": base, "variants": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.today:
        with torch.no_grad():
            report["today"] = {
                "weights": args.today,
                "clean_accuracy": clean_accuracy(create_clip(cfg.model.arch, args.today), cfg),
            }
        print(f"today: {report['today']['clean_accuracy']}", flush=True)
    for name in args.variants.split(","):
        recipe = base | VARIANTS[name]
        start = time.perf_counter()
        model = pretrain_clip(cfg.model.arch, corpus.images, corpus.captions, seed=cfg.pretrain.seed, **recipe)
        seconds = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            accuracy = clean_accuracy(model, cfg)
        report["variants"][name] = {"recipe": recipe, "seconds": seconds, "clean_accuracy": accuracy}
        print(f"{name}: {seconds}s {accuracy}", flush=True)
        out.write_text(json.dumps(report, indent=2))  # after every variant: a long run keeps what it measured
    ref, today = report["variants"].get("ref"), report.get("today")
    for result in report["variants"].values():
        if ref:
            result["time_ratio_to_ref"] = round(result["seconds"] / ref["seconds"], 3)
        if today:  # the acceptance test: no suite dataset more than 1 point below today's teacher
            result["worst_drop_vs_today_points"] = round(
                max(
                    today["clean_accuracy"][d] - result["clean_accuracy"][d]
                    for d in today["clean_accuracy"]
                    if d != "mean"
                ),
                2,
            )
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
