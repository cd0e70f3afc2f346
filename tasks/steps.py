"""The remote steps of the DAG. Each loads what it needs from its arguments and writes files."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch
from torchvision.transforms.functional import to_pil_image

from agft_core import world
from agft_core.cache import (
    describe_file,
    embedding_table,
    embeddings_of,
    file_sha256,
    join,
    read_parquet,
    upload,
    write_parquet,
)
from agft_core.calibration import Calibration, fit_gamma
from agft_core.catalog import DatasetSpec
from agft_core.datasets import DatasetInfo, load_dataset, undecodable
from agft_core.errors import InputError
from agft_core.evaluate import embed_images, zero_shot_accuracy
from agft_core.model import (
    ImageEncoder,
    class_text_embeddings,
    create_clip,
    load_weights,
    logit_scale,
    preprocess_cfg,
    save_weights,
    state_digest,
)
from agft_core.pretrain import pretrain_clip
from tasks.common import ran_since, task_device, use_assigned_cpus

SERVED_CLIP, SERVED_EXAMPLE = "clip.safetensors", "example.png"


@ray.remote
def pretrain_teacher(
    arch: str, world_seed: int, *, out_dir: str, corpus_size: int, epochs: int, **recipe
) -> list[dict]:
    """corpus_size, epochs and recipe: every pretrain config field (recipe: pretrain_clip's other arguments)."""
    use_assigned_cpus()
    corpus = world.generate("corpus", "pretrain", corpus_size, world_seed)
    model = pretrain_clip(
        arch,
        corpus.images,
        corpus.captions,
        epochs=epochs,
        **recipe,
        on_epoch=lambda e, loss: print(f"pretrain epoch {e + 1}/{epochs}: loss {loss:.3f}", flush=True),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.safetensors"
        save_weights(model, path, arch)
        upload(path, join(out_dir, path.name))
    return [describe_file(join(out_dir, path.name))]


@ray.remote
def describe_model(arch: str, weights: str | None) -> tuple[str, dict]:
    """The weights' content digest and the model's preprocessing, read where the weights are."""
    model = create_clip(arch, weights)
    return state_digest(model), preprocess_cfg(model)


@ray.remote
def servable_clip(
    arch: str, weights: str | None, encoder_weights: str | None, spec: DatasetSpec, image_size: int, out_dir: str
) -> list[dict]:
    """What a served model is made of, written to out_dir: clip.safetensors, the teacher with the fine-tuned
    image tower when encoder_weights is given, and example.png, the first image of `spec` as the model's input
    example. Made where the weights and the data are."""
    model = create_clip(arch, weights)
    if encoder_weights is not None:
        load_weights(ImageEncoder.from_clip(model), encoder_weights)  # the encoder shares model.visual
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(model, Path(tmp) / SERVED_CLIP, arch)
        to_pil_image(_first_decodable(spec, image_size)).save(Path(tmp) / SERVED_EXAMPLE)
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


@ray.remote
def describe_dataset(spec: DatasetSpec, image_size: int) -> DatasetInfo:
    """The dataset's classes, prompts, size and identity (its files' listing stat'ed here, once per run)."""
    return load_dataset(spec, image_size).info()


@ray.remote
def find_undecodable(spec: DatasetSpec, image_size: int, start: int, stop: int) -> list[str]:
    """The error line of each image of spec[start:stop] that fails to decode, naming its file."""
    use_assigned_cpus()
    return list(undecodable(load_dataset(spec, image_size).images, range(start, stop)).values())


@ray.remote
def calibrate_gamma(teacher_files: list[str], text_files: list[str], inv_tau: float) -> Calibration:
    """calibration.gamma: auto, from the teacher cache of the training split and its class-prompt cache."""
    teacher = read_parquet(teacher_files)

    def column(name):
        return torch.from_numpy(teacher.column(name).to_numpy())

    return fit_gamma(
        torch.from_numpy(embeddings_of(teacher)),
        column("label"),
        column("index"),
        torch.from_numpy(embeddings_of(read_parquet(text_files))),
        inv_tau,
    )


@ray.remote
def file_digest(location: str) -> str:
    """The SHA-256 of a weights file, read where it is."""
    return file_sha256(location)


@ray.remote
def cuda_available() -> bool:
    """Run with a GPU request: whether the node Ray picks for GPU work has CUDA."""
    return torch.cuda.is_available()


@ray.remote
def embed_class_prompts(arch: str, weights: str | None, spec: DatasetSpec, image_size: int, out_path: str) -> dict:
    """The text cache of one dataset: {"file": its description} and when and where the task ran."""
    start = time.time()
    use_assigned_cpus()
    data = load_dataset(spec, image_size)
    model = create_clip(arch, weights).to(task_device("text cache"))
    emb = class_text_embeddings(model, arch, data.classnames, data.templates).cpu().numpy()
    columns = {
        "class_index": np.arange(len(data.classnames)),
        "classname": data.classnames,
        "templates": [data.templates] * len(data.classnames),
    }
    return {"file": write_parquet(embedding_table(columns, emb), out_path), **ran_since(start)}


@ray.remote
def teacher_shard(
    arch: str,
    weights: str | None,
    spec: DatasetSpec,
    image_size: int,
    start: int,
    stop: int,
    batch_size: int,
    loader_workers: int,
    out_path: str,
) -> dict:
    """One shard of the teacher cache: {"file": its description} and when and where the task ran."""
    began = time.time()
    use_assigned_cpus()
    device = task_device("teacher cache")
    data = load_dataset(spec, image_size)
    encoder = ImageEncoder.from_clip(create_clip(arch, weights)).to(device)
    labels, emb = embed_images(encoder, data.images, range(start, stop), batch_size, device, loader_workers)
    table = embedding_table({"index": np.arange(start, stop), "label": labels.numpy()}, emb.numpy())
    return {"file": write_parquet(table, out_path), **ran_since(began)}


@ray.remote
def evaluate_zero_shot(
    arch: str,
    weights: str | None,
    encoders: dict[str, str | None],
    spec: DatasetSpec,
    image_size: int,
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
    data = load_dataset(spec, image_size)
    clip = create_clip(arch, weights)
    scale = logit_scale(clip)
    text = torch.from_numpy(np.array(text_emb))
    rows = []
    for name, encoder_weights in encoders.items():
        encoder = ImageEncoder.from_clip(clip if encoder_weights is None else create_clip(arch, weights))
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
            rows.append(
                {
                    "model": name,
                    "dataset": spec.name,
                    "attack": attack,
                    "eps": eps,
                    "alpha": alpha,
                    "steps": steps,
                    "restarts": restarts,
                    **scores,
                }
            )
    return {"rows": rows, "dataset": spec.name, **ran_since(start)}
