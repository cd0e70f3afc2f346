"""The demo's teacher and fine-tuned image encoder, read from the cache of a finished `agft run` of
configs/demo.yaml (not rebuilt): what the attack benchmarks score."""

import glob
import json
import os
import time

from agft_core.model import ImageEncoder, create_clip, load_weights


def newest(pattern: str) -> str:
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"nothing matches {pattern}: run `agft run --set cache_dir=...` first")
    return found[-1]


def demo_models(cache_dir: str, arch: str, original: bool):
    """(the teacher CLIP, {"original"?, "finetuned": image encoder})."""
    teacher = newest(f"{cache_dir}/pretrain/*/attempt-*/clip.safetensors")
    clip = create_clip(arch, teacher)
    encoders = {"original": ImageEncoder.from_clip(clip)} if original else {}
    tuned = ImageEncoder.from_clip(create_clip(arch, teacher))
    load_weights(tuned, newest(f"{cache_dir}/finetune/*/attempt-*/image_encoder.safetensors"))
    return clip, encoders | {"finetuned": tuned}


def result_row(dataset: str, model: str, attack: str, scores: dict, started: float, **more) -> dict:
    """One measured cell (accuracies and the seconds since `started`), printed at once to show the progress."""
    row = {"dataset": dataset, "model": model, "attack": attack, **more}
    seconds = round(time.perf_counter() - started, 2)
    row |= {"clean": scores["clean"], "attacked": scores["attacked"], "seconds": seconds}
    print(json.dumps(row), flush=True)
    return row
