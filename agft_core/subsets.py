"""The seeded, class-stratified subset a dataset's `limit` draws, the labels it is stratified by, and the
consecutive ranges a dataset's images are split into for tasks."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


def known_labels(images: Dataset) -> list[int] | None:
    """Each image's label, where the loader keeps them beside the images (no decoding); None where it does not
    (PCAM reads them from its HDF5 file item by item)."""
    for attribute in ("targets", "_labels", "labels", "y"):  # ImageFolder/CIFAR, most others, STL-10/Parquet, Caltech
        labels = getattr(images, attribute, None)
        if labels is not None:
            return [int(label) for label in labels]
    samples = getattr(images, "_samples", None)  # Stanford Cars: (file, label) pairs
    return [int(label) for _, label in samples] if samples is not None else None


def subset_indices(size: int, limit: int, seed: int, labels: list[int] | None) -> list[int]:
    """`limit` of `size` images drawn at random from `seed`, each class getting its share of the limit (the
    remainder to the classes with the largest fractions, ties drawn at random), in their original order.
    Without labels, a plain random draw."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return sorted(rng.choice(size, limit, replace=False).tolist())
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    classes = sorted(members)
    shares = np.array([limit * len(members[c]) / size for c in classes])
    take = np.floor(shares).astype(int)
    order = np.lexsort((rng.permutation(len(classes)), -(shares - take)))  # largest fraction first, ties at random
    take[order[: limit - take.sum()]] += 1
    return sorted(i for c, n in zip(classes, take) for i in rng.choice(members[c], n, replace=False).tolist())


def image_ranges(size: int, per_range: int) -> list[tuple[int, int]]:
    """Images [0, size) as consecutive [start, stop) ranges of per_range images, the last one shorter."""
    return [(start, min(start + per_range, size)) for start in range(0, size, per_range)]
