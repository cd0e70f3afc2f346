"""Classification datasets with their class names and prompt templates.

Two sources: the embedded world (generated, offline, the default) and torchvision loaders
reading a local root. Every dataset yields pixels in [0, 1] at the model's image size.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from agft_core import world

EMBEDDED_COUNTS = {"train": 6000, "test": 1000}
CLIP_TEMPLATE = "This is a photo of a {}."


@dataclass(frozen=True)
class Loader:
    splits: tuple[str, ...]
    layout: str  # what the root must contain, for error messages


LOADERS = {
    "imagenet": Loader(("train", "val"), "<root>/{train,val}/<wnid>/*.JPEG"),
    "cifar10": Loader(("train", "test"), "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    "cifar100": Loader(("train", "test"), "<root>/cifar-100-python/{train,test,meta}"),
    "imagefolder": Loader(("train", "val", "test"), "<root>/<split>/<class name>/*.{jpg,png}"),
}
KINDS = ("embedded", *LOADERS)


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    name: str
    split: str
    root: str | None = None
    limit: int | None = None
    world_seed: int = 0
    templates: tuple[str, ...] | None = None  # overrides the dataset's own prompt templates


@dataclass
class ClassificationData:
    name: str
    images: Dataset  # items: (pixels float [3, H, W] in [0, 1], label int)
    classnames: list[str]
    templates: list[str]
    identity: dict = field(default_factory=dict)  # what the dataset's content is, for fingerprints

    def __len__(self) -> int:
        return len(self.images)


def check_spec(kind: str, name: str, split: str, root: str | None) -> None:
    """Schema-level validation (no file system access)."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid: {list(KINDS)}")
    if kind == "embedded":
        if name not in world.TASKS:
            raise ValueError(f"unknown embedded dataset {name!r}; valid: {sorted(world.TASKS)}")
        if split not in EMBEDDED_COUNTS:
            raise ValueError(f"embedded split must be one of {list(EMBEDDED_COUNTS)}, got {split!r}")
        return
    if split not in LOADERS[kind].splits:
        raise ValueError(f"{kind} split must be one of {list(LOADERS[kind].splits)}, got {split!r}")
    if not root:
        raise ValueError(f"{kind} needs a root directory laid out as {LOADERS[kind].layout}")


def check_root(spec: DatasetSpec) -> str | None:
    """Why the dataset's files can't be read, or None."""
    if spec.kind == "embedded":
        return None
    layout = LOADERS[spec.kind].layout
    root = Path(spec.root)
    expected = {"imagenet": root / spec.split, "imagefolder": root / spec.split,
                "cifar10": root / "cifar-10-batches-py", "cifar100": root / "cifar-100-python"}[spec.kind]
    if not expected.is_dir():
        return f"{spec.name}: {expected} not found; expected layout {layout}"
    return None


def pixel_transform(size: int) -> T.Compose:
    # The paper's Resize + CenterCrop, without Normalize: the model normalises internally.
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()])


def _limited(data: ClassificationData, limit: int | None) -> ClassificationData:
    if limit is None or limit >= len(data.images):
        return data
    data.images = Subset(data.images, range(limit))
    data.identity = {**data.identity, "limit": limit}
    return data


def _embedded(spec: DatasetSpec, size: int) -> ClassificationData:
    task = world.TASKS[spec.name]
    count = min(spec.limit or EMBEDDED_COUNTS[spec.split], EMBEDDED_COUNTS[spec.split])
    generated = world.generate(spec.name, spec.split, count, spec.world_seed)
    pixels = torch.from_numpy(generated.images).permute(0, 3, 1, 2).float().div_(255)
    if size != world.IMAGE_SIZE:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic").clamp_(0, 1)
    content = hashlib.sha256(generated.images.tobytes() + generated.labels.tobytes()).hexdigest()
    return ClassificationData(spec.name, TensorDataset(pixels, torch.from_numpy(generated.labels)),
                              list(task.classnames), [task.template],
                              {"kind": "embedded", "name": spec.name, "split": spec.split, "content": content,
                               "size": size})


def _listing_digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(f"{p}:{Path(p).stat().st_size}\n".encode())
    return h.hexdigest()


def _from_root(spec: DatasetSpec, size: int) -> ClassificationData:
    transform = pixel_transform(size)
    root = Path(spec.root)
    if spec.kind in ("imagenet", "imagefolder"):
        images = tvd.ImageFolder(str(root / spec.split), transform=transform)
        if spec.kind == "imagenet":
            from open_clip import IMAGENET_CLASSNAMES
            classnames = list(IMAGENET_CLASSNAMES)
            if len(images.classes) != len(classnames):
                raise ValueError(f"{spec.name}: found {len(images.classes)} class folders under "
                                 f"{root / spec.split}, expected 1000 ({LOADERS['imagenet'].layout})")
        else:
            classnames = [c.replace("_", " ") for c in images.classes]
        files = [p for p, _ in images.samples]
    else:
        cls = tvd.CIFAR10 if spec.kind == "cifar10" else tvd.CIFAR100
        images = cls(str(root), train=spec.split == "train", transform=transform, download=False)
        classnames = [c.replace("_", " ") for c in images.classes]
        files = sorted(p for p in (root / cls.base_folder).iterdir() if p.is_file())
    identity = {"kind": spec.kind, "split": spec.split, "root": str(root.resolve()),
                "listing": _listing_digest(files), "size": size}
    return ClassificationData(spec.name, images, classnames, [CLIP_TEMPLATE], identity)


def load_dataset(spec: DatasetSpec, size: int) -> ClassificationData:
    problem = check_root(spec)
    if problem:
        raise FileNotFoundError(problem)
    data = _embedded(spec, size) if spec.kind == "embedded" else _from_root(spec, size)
    if spec.templates:
        data.templates = list(spec.templates)
    return _limited(data, spec.limit)

