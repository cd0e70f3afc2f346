"""Ray Data streams of decoded images (data.decode: ray_data): CPU actors on any node decode the training images,
GPU actors embed them for the teacher cache (on a cluster without GPUs, the decoders embed what they decode), and
train workers read their split of the same stream. Apart from tasks/caches.py so that a task that does not stream
never imports Ray Data."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy

from agft_core.cache import describe_parquet_files, embedding_table
from agft_core.catalog import DatasetSpec
from agft_core.datasets import load_dataset
from agft_core.model import ImageEncoder, create_clip
from tasks.common import ModelSource, ran_since, task_device, use_assigned_cpus
from tasks.parquet_parts import CacheParts


class DecodeImages:
    """Ray Data's decode stage, in CPU actors: a batch of image indices to their (index, label, pixels)."""

    def __init__(self, spec: DatasetSpec, image_size: int):
        use_assigned_cpus()
        self.images = load_dataset(spec, image_size).images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [self.images[int(i)] for i in batch["data"]]
        return {
            "index": batch["data"],
            "label": np.array([int(label) for _, label in pairs]),
            "pixels": np.stack([pixels.numpy() for pixels, _ in pairs]),
        }


class EmbedImages:
    """Ray Data's model stage, in GPU actors (CPU ones without GPUs): decoded images to the teacher cache's rows."""

    def __init__(self, model: ModelSource):
        use_assigned_cpus()
        self.device = task_device("teacher cache")
        self.encoder = ImageEncoder.from_clip(create_clip(model.arch, model.weights)).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pixels = torch.from_numpy(batch["pixels"]).to(self.device, non_blocking=True)
        embeddings = self.encoder(pixels).float().cpu().numpy()
        return embedding_table({"index": batch["index"], "label": batch["label"]}, embeddings)


class DecodeAndEmbed:
    """Both stages in one CPU actor, for a cluster without GPUs: a model actor apart would hold CPUs the decoders
    need (on 2 cores, one of the two) and the pixels would cross the object store for nothing. Each holds a copy of
    the model, computing on resources.decode_cpus threads: fewer, wider actors hold fewer copies."""

    def __init__(self, spec: DatasetSpec, model: ModelSource):
        self.decode = DecodeImages(spec, model.image_size)
        self.embed = EmbedImages(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.embed(self.decode(batch))


@dataclass(frozen=True)
class Streaming:
    """How a Ray Data stream is spread: decode actors of decode_cpus each (up to `decoders`), and for the teacher
    cache `embedders` model actors of (task_cpus, task_gpus), or with `fused` the decoders embedding what they
    decode; batches of batch_size images."""

    decoders: int
    decode_cpus: float
    embedders: int
    task_cpus: float
    task_gpus: float
    batch_size: int
    fused: bool


def decoded_images(
    spec: DatasetSpec, image_size: int, size: int, plan: Streaming, shuffle_seed: int | None = None
) -> ray.data.Dataset:
    """The dataset's images [0, size) as a Ray Data stream of (index, label, pixels), decoded by an autoscaling pool
    of up to plan.decoders CPU actors on any node; shuffle_seed: in an order drawn from it."""
    return _indices(size, plan, shuffle_seed).map_batches(
        DecodeImages,
        fn_constructor_args=(spec, image_size),
        batch_size=plan.batch_size,
        compute=ActorPoolStrategy(min_size=1, max_size=plan.decoders),
        num_cpus=plan.decode_cpus,
    )


def _indices(size: int, plan: Streaming, shuffle_seed: int | None = None) -> ray.data.Dataset:
    # one line per stage and block would flood the run's console: the run's own lines say where the build is
    ray.data.DataContext.get_current().enable_progress_bars = False
    order = np.arange(size) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(size)
    # blocks made here, not by read tasks: a read task waiting for a CPU the actors hold would never run
    return ray.data.from_numpy(np.array_split(order, max(1, size // plan.batch_size)))


@ray.remote(num_cpus=0)  # it only drives the dataset: its actors hold the resources
def stream_teacher_cache(model: ModelSource, spec: DatasetSpec, *, size: int, plan: Streaming, out_dir: str) -> dict:
    """The whole teacher cache through Ray Data, written as Parquet files into out_dir block by block as they are
    embedded: {"files": their descriptions} and when and where the build ran."""
    began = time.time()
    if plan.fused:
        embedded = _indices(size, plan).map_batches(
            DecodeAndEmbed,
            fn_constructor_args=(spec, model),
            batch_size=plan.batch_size,
            compute=ActorPoolStrategy(min_size=1, max_size=plan.decoders),
            num_cpus=plan.decode_cpus,
        )
    else:
        embedded = decoded_images(spec, model.image_size, size, plan).map_batches(
            EmbedImages,
            fn_constructor_args=(model,),
            batch_size=plan.batch_size,
            compute=ActorPoolStrategy(size=plan.embedders),
            num_cpus=plan.task_cpus,
            num_gpus=plan.task_gpus,
        )
    # The writes take no CPU of their own (on a small node the actors hold every CPU), so nothing but `concurrency`
    # bounds how many run at once: without it Ray started a worker process per block (30 at once on 2 cores). One
    # writer per actor that embeds keeps up with them.
    writers = plan.decoders if plan.fused else plan.embedders
    embedded.write_parquet(
        out_dir, filename_provider=CacheParts(), concurrency=writers, ray_remote_args={"num_cpus": 0}
    )
    return {"files": describe_parquet_files(out_dir), **ran_since(began)}
