"""The describe stage's tasks: what a dataset and a model are, read where the data and the weights are."""

from __future__ import annotations

import ray
import torch

from agft_core.cache import file_sha256
from agft_core.catalog import DatasetInfo, DatasetSpec
from agft_core.datasets import load_dataset, undecodable
from agft_core.model import create_clip, preprocess_cfg, state_digest
from tasks.common import use_assigned_cpus


@ray.remote
def describe_dataset(spec: DatasetSpec, *, image_size: int) -> DatasetInfo:
    """The dataset's classes, prompts, size and identity (its files' listing stat'ed here, once per run)."""
    return load_dataset(spec, image_size).info()


@ray.remote
def find_undecodable(spec: DatasetSpec, *, image_size: int, start: int, stop: int) -> dict[int, str]:
    """index -> the error line (naming its file) of each image of spec[start:stop] that fails to decode."""
    use_assigned_cpus()
    return undecodable(load_dataset(spec, image_size).images, range(start, stop))


@ray.remote
def describe_model(arch: str, weights: str | None) -> tuple[str, dict]:
    """The weights' content digest and the model's preprocessing, read where the weights are."""
    model = create_clip(arch, weights)
    return state_digest(model), preprocess_cfg(model)


@ray.remote
def file_digest(location: str) -> str:
    """The SHA-256 of a weights file, read where it is."""
    return file_sha256(location)


@ray.remote
def cuda_available() -> bool:
    """Run with a GPU request: whether the node Ray picks for GPU work has CUDA."""
    return torch.cuda.is_available()
