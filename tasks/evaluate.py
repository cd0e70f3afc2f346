"""The evaluate stage's task: zero-shot clean and robust accuracy on one dataset."""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from agft_core.catalog import DatasetSpec
from agft_core.datasets import load_dataset
from agft_core.evaluate import zero_shot_accuracy
from agft_core.model import ImageEncoder, create_clip, load_weights, logit_scale
from tasks.common import ModelSource, ran_since, task_device, use_assigned_cpus


@ray.remote
def evaluate_zero_shot(
    model: ModelSource,
    spec: DatasetSpec,
    *,
    encoders: dict[str, str | None],
    text_emb: np.ndarray,
    attacks: list[tuple[str, float, float, int, int]],
    batch_size: int,
    seed: int,
    loader_workers: int,
) -> dict:
    """Clean and robust accuracy of each encoder (None: the original one, else a fine-tuned image
    encoder's weights) under each (attack, ε, α, steps, restarts): one row per pair, with when and where the
    task ran (for the run's timeline)."""
    start = time.time()
    use_assigned_cpus()
    device = task_device("eval")
    data = load_dataset(spec, model.image_size)
    clip = create_clip(model.arch, model.weights)
    scale = logit_scale(clip)
    text = torch.from_numpy(np.array(text_emb))
    rows = []
    for name, encoder_weights in encoders.items():
        encoder = ImageEncoder.from_clip(clip if encoder_weights is None else create_clip(model.arch, model.weights))
        if encoder_weights is not None:
            load_weights(encoder, encoder_weights)
        encoder.to(device)
        for attack, eps, alpha, steps, restarts in attacks:
            generator = torch.Generator(device).manual_seed(seed)
            scores = zero_shot_accuracy(
                encoder,
                text,
                scale,
                data.images,
                eps=eps,
                alpha=alpha,
                steps=steps,
                batch_size=batch_size,
                device=device,
                generator=generator,
                attack=attack,
                restarts=restarts,
                loader_workers=loader_workers,
            )
            row = {"model": name, "dataset": spec.name, "attack": attack, "eps": eps, "alpha": alpha}
            rows.append(row | {"steps": steps, "restarts": restarts, **scores})
    return {"rows": rows, "dataset": spec.name, **ran_since(start)}
