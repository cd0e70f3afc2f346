"""How a train worker reads its share of the training set, each batch (pixels, labels, image indices): a
DataLoader over its DistributedSampler shard (data.decode: loader), or its split of a Ray Data stream decoded by CPU
actors on any node (data.decode: ray_data). pipeline/trainer.py gives the trainer that stream."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from ray.data import DataIterator
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from pipeline.config.schema import Config

STREAMED = "train"  # the trainer's Ray Data dataset under data.decode: ray_data


class LoaderIngest:
    """data.decode: loader. This worker's DistributedSampler share of the training set, decoded by a DataLoader
    (resources.loader_workers processes kept across epochs): the same batches for the same seed, every run."""

    def __init__(self, cfg: Config, images: Dataset, rank: int, world_size: int, device: torch.device):
        indexed = _Indexed(images)
        self.sampler = DistributedSampler(
            indexed, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        loaders = cfg.resources.loader_processes(cfg.train.cpus_per_worker)
        self.loader = DataLoader(
            indexed,
            batch_size=cfg.train.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=loaders,
            persistent_workers=loaders > 0,  # each epoch reuses its decoders instead of forking them again
            pin_memory=device.type == "cuda",
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[tuple]:
        self.sampler.set_epoch(epoch)
        yield from self.loader


class StreamedIngest:
    """data.decode: ray_data. This worker's split of the Ray Data stream the trainer was given (decoded by CPU actors
    on any node, in one shuffled order), reshuffled locally each epoch. Every split has the same number of images,
    so every worker takes the same number of steps; the order is not bit-reproducible (blocks arrive as they are
    decoded)."""

    def __init__(self, shard: DataIterator, cfg: Config, size: int, world_size: int, device: torch.device):
        self.shard, self.device = shard, device
        self.batch_size, self.seed = cfg.train.batch_size, cfg.seed
        self.steps = size // world_size // cfg.train.batch_size

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterator[tuple]:
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            device=self.device,  # Ray's default is Ray Train's GPU, also where CUDA is missing (resources.cpu_fallback)
            drop_last=True,
            local_shuffle_buffer_size=4 * self.batch_size,
            local_shuffle_seed=self.seed + epoch,
        )
        for batch in itertools.islice(batches, self.steps):
            yield batch["pixels"], batch["label"], batch["index"]


class _Indexed(Dataset):
    """Yields (pixels, label, index) so a batch can look up its rows of the teacher cache."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.images[i]
        return x, y, i
