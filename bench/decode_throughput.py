"""Who should decode the training images (data.decode): images/s of the teacher-cache build and of the training
ingest through each path, on the same generated ImageNet-sized JPEGs, and the CPU time one image's decode and
preprocessing costs, from which docs/cluster.md sizes the CPUs per GPU of the paper run.

Usage: .venv/bin/python bench/decode_throughput.py [--images 1000 4000] [--out bench/results/decode_throughput.json]

- decode cost: one process decodes and preprocesses (224 px, as for ViT-B/32) `--cost-images` JPEGs of 500 × 375
  (ImageNet's typical size), timed in CPU seconds;
- teacher cache: `prepare()` with `--rerun teacher` under each data.decode on a local Ray of this machine's CPUs,
  the embedded tiny model (the build is bound by decoding, not by the model), its "teacher" step timed;
- training ingest: the images of one epoch as a train worker gets them, decoded by a DataLoader with one worker
  process (loader) or streamed from Ray Data's decode actors (ray_data), without the train step.

Each is timed on the first `--images` count and on the second, interleaved: the rate at each size includes what a
path pays once (Ray Data's actors import torch before the first image), and the marginal rate, (n2 - n1) / (t2 - t1),
is what a path sustains once started, which is what a build of a million images sees.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import ray
import torch
from PIL import Image, ImageDraw

from agft_core.datasets import load_dataset
from pipeline.cluster import alive_nodes, streaming_plan
from pipeline.config.loading import load_config
from pipeline.context import RunContext
from pipeline.ingest import LoaderIngest
from pipeline.run import prepare
from tasks.streaming import decoded_images

CLASSES = 10


def write_jpegs(root: Path, count: int) -> None:
    """`count` JPEGs of 500 × 375 in CLASSES folders: smooth gradients with shapes, so that they compress like
    photographs (noise would make every file several times larger than ImageNet's ~110 kB)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 500)[None, :, None] * np.linspace(0, 1, 375)[:, None, None]
    for i in range(count):
        folder = root / "train" / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((255 * ramp * rng.uniform(0.3, 1, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, w, h = rng.integers(0, 450), rng.integers(0, 325), *rng.integers(20, 120, 2)
            draw.ellipse((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(folder / f"{i}.jpg", quality=90)


def decode_cost(root: Path, count: int) -> dict:
    cfg = _config(root, root / "unused", "loader", count)
    images = load_dataset(cfg.data.train.spec(cfg.data.world_seed), 224).images
    start = time.process_time()
    for i in range(count):
        images[i]
    seconds = (time.process_time() - start) / count
    return {"cpu_seconds_per_image": round(seconds, 5), "images_per_cpu_second": round(1 / seconds, 1)}


def _config(root: Path, cache: Path, decode: str, images: int):
    data = f"{{kind: imagefolder, name: jpegs, split: train, root: {root}}}"
    return load_config(
        None,
        [
            "model.weights=random",
            f"data.train={data}",
            f"data.zero_shot=[{{kind: imagefolder, name: jpegs-zs, split: train, root: {root}, limit: 10}}]",
            f"data.decode={decode}",
            f"data.train.limit={images}",
            "calibration.gamma=0.5",
            "train.batch_size=64",
            "eval.batch_size=64",
            f"resources.loader_workers={1 if decode == 'loader' else 0}",
            f"cache_dir={cache}",
        ],
    )


def teacher_cache(root: Path, cache: Path, decode: str, images: int) -> float:
    """Seconds of the teacher cache's build."""
    cfg = _config(root, cache, decode, images)
    ctx = RunContext(cfg, f"sqlite:///{cache}/mlflow.db", frozenset({"teacher"}), log=lambda line: None)
    prepare(ctx, training=True)
    return ctx.seconds["teacher"]


def training_ingest(root: Path, decode: str, images: int) -> float:
    """Seconds from the ingest's start to the epoch's last batch."""
    cfg = _config(root, root / "unused", decode, images)
    spec = cfg.data.train.spec(cfg.data.world_seed)
    start = time.perf_counter()
    if decode == "loader":
        ingest = LoaderIngest(cfg, load_dataset(spec, 32).images, rank=0, world_size=1, device=torch.device("cpu"))
        seen = sum(len(y) for _, y, _ in ingest.epoch(0))
    else:
        plan = streaming_plan(cfg, alive_nodes(), cfg.train.batch_size)
        stream = decoded_images(spec, 32, images, plan, shuffle_seed=0)
        seen = sum(len(batch["label"]) for batch in stream.iter_torch_batches(batch_size=64, drop_last=True))
    assert seen == images // 64 * 64, seen
    return time.perf_counter() - start


STAGES = ("teacher_cache", "training_ingest")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, nargs=2, default=[1000, 4000], metavar=("N1", "N2"))
    parser.add_argument("--cost-images", type=int, default=200)
    parser.add_argument("--out", default="bench/results/decode_throughput.json")
    args = parser.parse_args()
    small, large = args.images
    seconds = {}
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, large)
        cost = decode_cost(root, args.cost_images)
        print(json.dumps({"decode": cost}), flush=True)
        ray.init(num_cpus=os.cpu_count(), logging_level="WARNING")
        for decode in ("loader", "ray_data"):  # untimed: Ray's worker processes start and import torch once
            teacher_cache(root, root / f"warm-{decode}", decode, small)
        for n in (small, large):
            for decode in ("loader", "ray_data"):
                seconds[decode, "teacher_cache", n] = teacher_cache(root, root / f"cache-{decode}-{n}", decode, n)
                seconds[decode, "training_ingest", n] = training_ingest(root, decode, n)
                print(decode, n, {stage: round(seconds[decode, stage, n], 2) for stage in STAGES}, flush=True)
        ray.shutdown()
    rates = {
        decode: {
            stage: {
                "seconds": {n: round(seconds[decode, stage, n], 2) for n in (small, large)},
                "images_per_s": {n: round(n / seconds[decode, stage, n], 1) for n in (small, large)},
                "marginal_images_per_s": round(
                    (large - small) / (seconds[decode, stage, large] - seconds[decode, stage, small]), 1
                ),
            }
            for stage in STAGES
        }
        for decode in ("loader", "ray_data")
    }
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": f"bench/decode_throughput.py --images {small} {large} --cost-images {args.cost_images}",
        "jpeg": "500 x 375, quality 90, preprocessed to 224 px for the cost and to the tiny model's 32 px for the rest",
        "decode_cost": cost,
        "rates": rates,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
