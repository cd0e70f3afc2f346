"""The caches stage's tasks: the class-prompt embeddings of a dataset, and a shard of the frozen teacher's image
embeddings of the training set (data.decode: loader; tasks/streaming.py builds it through Ray Data), each written
as Parquet."""

from __future__ import annotations

import time

import numpy as np
import ray

from agft_core.cache import embedding_table, write_parquet
from agft_core.catalog import DatasetSpec
from agft_core.datasets import load_dataset
from agft_core.evaluate import embed_images
from agft_core.model import ImageEncoder, class_text_embeddings, create_clip
from tasks.common import ModelSource, ran_since, task_device, use_assigned_cpus


@ray.remote
def embed_class_prompts(model: ModelSource, spec: DatasetSpec, *, out_path: str) -> dict:
    """The text cache of one dataset: {"file": its description} and when and where the task ran."""
    start = time.time()
    use_assigned_cpus()
    data = load_dataset(spec, model.image_size)
    clip = create_clip(model.arch, model.weights).to(task_device("text cache"))
    emb = class_text_embeddings(clip, model.arch, data.classnames, data.templates).cpu().numpy()
    columns = {
        "class_index": np.arange(len(data.classnames)),
        "classname": data.classnames,
        "templates": [data.templates] * len(data.classnames),
    }
    return {"files": [write_parquet(embedding_table(columns, emb), out_path)], **ran_since(start)}


@ray.remote
def teacher_shard(
    model: ModelSource, spec: DatasetSpec, *, start: int, stop: int, batch_size: int, loader_workers: int, out_path: str
) -> dict:
    """One shard of the teacher cache, images [start, stop): {"file": its description} and when and where the
    task ran."""
    began = time.time()
    use_assigned_cpus()
    device = task_device("teacher cache")
    data = load_dataset(spec, model.image_size)
    encoder = ImageEncoder.from_clip(create_clip(model.arch, model.weights)).to(device)
    labels, emb = embed_images(encoder, data.images, range(start, stop), batch_size, device, loader_workers)
    table = embedding_table({"index": np.arange(start, stop), "label": labels.numpy()}, emb.numpy())
    return {"files": [write_parquet(table, out_path)], **ran_since(began)}
