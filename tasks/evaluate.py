"""The evaluate stage's task: one shard of one (dataset, encoder, attack) cell, cached as soon as it is scored."""

from __future__ import annotations

import json
import time

import numpy as np
import ray
import torch

from agft_core.cache import CacheEntry, describe_file, join, write_bytes
from agft_core.catalog import DatasetSpec
from agft_core.datasets import load_dataset
from agft_core.evaluate import zero_shot_counts
from agft_core.model import ImageEncoder, create_clip, load_weights, logit_scale
from tasks.common import ModelSource, ran_since, task_device, use_assigned_cpus

RESULT_FILE = "result.json"


@ray.remote
def evaluate_shard(
    model: ModelSource,
    spec: DatasetSpec,
    *,
    encoder_weights: str | None,
    text_emb: np.ndarray,
    attack: tuple[str, float, float, int, int],
    images: tuple[int, int],
    batch_size: int,
    precision: str,
    seed: int,
    loader_workers: int,
    out: CacheEntry,
) -> dict:
    """How many of the dataset's images [start, stop) the encoder (None: the original one, else a fine-tuned
    image encoder's weights) classifies correctly, clean and under the (attack, ε, α, steps, restarts) in
    `precision`, written
    to `out` before it returns: a shard scored is kept even if the driver dies. Returns the counts and when and
    where the task ran (for the run's timeline)."""
    began = time.time()
    use_assigned_cpus()
    device = task_device("eval")
    data = load_dataset(spec, model.image_size)
    clip = create_clip(model.arch, model.weights)
    scale = logit_scale(clip)
    encoder = ImageEncoder.from_clip(clip)
    if encoder_weights is not None:
        load_weights(encoder, encoder_weights)
    name, eps, alpha, steps, restarts = attack
    start, stop = images
    # a shard's random starts depend on where it begins, not on which task ran before it: a dataset scored as
    # one shard draws from `seed` itself
    generator = torch.Generator(device).manual_seed(seed + start)
    counts = zero_shot_counts(
        encoder.to(device),
        torch.from_numpy(np.array(text_emb)),
        scale,
        data.images,
        eps=eps,
        alpha=alpha,
        steps=steps,
        batch_size=batch_size,
        device=device,
        generator=generator,
        attack=name,
        restarts=restarts,
        loader_workers=loader_workers,
        indices=range(start, stop),
        precision=precision,
    )
    with out.attempt() as attempt:
        write_bytes(join(attempt, RESULT_FILE), json.dumps(counts).encode())
        out.commit(attempt, [describe_file(join(attempt, RESULT_FILE), rows=1)])
    return {"counts": counts, "dataset": spec.name, **ran_since(began)}
