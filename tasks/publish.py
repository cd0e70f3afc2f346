"""The publish stage's task: the files a registered MLflow model is made of."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import ray
import torch
from torchvision.transforms.functional import to_pil_image

from agft_core.cache import describe_file, join, upload
from agft_core.catalog import DatasetSpec
from agft_core.datasets import load_dataset
from agft_core.errors import InputError
from agft_core.model import ImageEncoder, create_clip, load_weights, save_weights
from tasks.common import ModelSource

SERVED_CLIP, SERVED_EXAMPLE = "clip.safetensors", "example.png"


@ray.remote
def servable_clip(model: ModelSource, spec: DatasetSpec, *, encoder_weights: str | None, out_dir: str) -> list[dict]:
    """What a served model is made of, written to out_dir: clip.safetensors, the teacher with the fine-tuned
    image tower when encoder_weights is given, and example.png, the first image of `spec` as the model's input
    example. Made where the weights and the data are."""
    clip = create_clip(model.arch, model.weights)
    if encoder_weights is not None:
        load_weights(ImageEncoder.from_clip(clip), encoder_weights)  # the encoder shares clip.visual
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(clip, Path(tmp) / SERVED_CLIP, model.arch)
        to_pil_image(_first_decodable(spec, model.image_size)).save(Path(tmp) / SERVED_EXAMPLE)
        for name in (SERVED_CLIP, SERVED_EXAMPLE):
            upload(Path(tmp) / name, join(out_dir, name))
    return [describe_file(join(out_dir, name)) for name in (SERVED_CLIP, SERVED_EXAMPLE)]


def _first_decodable(spec: DatasetSpec, image_size: int) -> torch.Tensor:
    """The pixels of the dataset's first image that decodes, without the scan of every image that
    `corrupt: skip` makes."""
    images = load_dataset(replace(spec, corrupt="error"), image_size).images
    for i in range(len(images)):
        try:
            return images[i][0]
        except InputError:
            continue
    raise InputError(f"{spec.name}: no image decodes")
