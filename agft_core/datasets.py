"""Classification datasets with their class names and prompt templates.

Two sources: the embedded world (generated, offline, the default) and torchvision loaders
reading a local root. Every dataset yields pixels in [0, 1], at the size it is attacked at: the
model's input size, or the images' own for the small ones (the embedded world, CIFAR, STL-10).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from open_clip import IMAGENET_CLASSNAMES
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from agft_core import world
from agft_core.catalog import EMBEDDED_COUNTS, LOADERS, DatasetInfo, DatasetSpec, check_root
from agft_core.errors import InputError, first_line
from agft_core.subsets import known_labels, subset_indices


def clip_classnames(key: str) -> list[str]:
    """CLIP's curated class names of a zero-shot dataset (clip-benchmark's key), as clip-benchmark ships them.
    Installed without its dependencies (pyproject's [tool.agft]), as `make setup` and the image do."""
    try:
        return _clip_benchmark_classnames()[key]
    except ModuleNotFoundError:
        raise InputError(
            f"the class names are CLIP's curated ones (clip-benchmark's {key!r}), read from clip-benchmark, which is "
            "not installed; install it without its dependencies: pip install --no-deps clip-benchmark"
        ) from None


@cache
def _clip_benchmark_classnames() -> dict[str, list[str]]:
    return json.loads(resources.files("clip_benchmark.datasets").joinpath("en_classnames.json").read_text())


def _curated(name: str, key: str, own: list[str]) -> dict[str, str]:
    """The dataset's own class folders (sorted, as CLIP's list is) -> CLIP's curated name."""
    curated = clip_classnames(key)
    if len(curated) != len(own):
        raise InputError(
            f"{name}: found {len(own)} class folders, but CLIP's curated names (clip-benchmark's "
            f"{key}) are for the {len(curated)} of the whole dataset; give the whole dataset"
        )
    return dict(zip(own, curated))


@dataclass
class ClassificationData:
    name: str
    images: Dataset  # items: (pixels float [3, H, W] in [0, 1], label int)
    classnames: list[str]
    templates: list[str]
    identity: dict = field(default_factory=dict)  # what the dataset's content is, for fingerprints
    # The files whose paths and sizes fingerprint a dataset read from a root: stat'ed only when info() is asked
    # for, once per dataset and run (describe), not by each task that reads the images.
    files: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def info(self) -> DatasetInfo:
        identity = {**self.identity, "listing": _listing_digest(self.files)} if self.files else dict(self.identity)
        return DatasetInfo(self.name, list(self.classnames), list(self.templates), identity, len(self))


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")  # some datasets (Caltech101) hand over greyscale images as they are


def pixel_transform(size: int) -> T.Compose:
    # The paper's Resize + CenterCrop, without Normalize: the model normalises internally.
    return T.Compose(
        [_rgb, T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()]
    )


def _limited(data: ClassificationData, spec: DatasetSpec, labels: list[int] | None) -> ClassificationData:
    if spec.limit is None or spec.limit >= len(data.images):
        return data
    indices = subset_indices(len(data.images), spec.limit, spec.subset_seed, labels)
    data.images = Subset(data.images, indices)
    data.identity = {
        **data.identity,
        "limit": spec.limit,
        "subset_seed": spec.subset_seed,
        "stratified": labels is not None,
        "subset": hashlib.sha256(np.asarray(indices).tobytes()).hexdigest(),
    }
    return data


def _embedded(spec: DatasetSpec) -> ClassificationData:
    """At the world's own resolution: its images are small, and attacked as they are."""
    task = world.TASKS[spec.name]
    count = min(spec.limit or EMBEDDED_COUNTS[spec.split], EMBEDDED_COUNTS[spec.split])
    generated = world.generate(spec.name, spec.split, count, spec.world_seed)
    pixels = torch.from_numpy(generated.images).permute(0, 3, 1, 2).float().div_(255)
    content = hashlib.sha256(generated.images.tobytes() + generated.labels.tobytes()).hexdigest()
    return ClassificationData(
        spec.name,
        TensorDataset(pixels, torch.from_numpy(generated.labels)),
        list(task.classnames),
        [task.template],
        {"kind": "embedded", "name": spec.name, "split": spec.split, "content": content, "size": world.IMAGE_SIZE},
    )


def _listing_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(f"{p}:{Path(p).stat().st_size}\n".encode())
    return h.hexdigest()


class ParquetImages(Dataset):
    """A Parquet table of encoded images and integer labels: the user's own data in one file."""

    def __init__(self, path: Path, transform):
        table = pq.read_table(path)
        missing = {"image", "label"} - set(table.column_names)
        classnames = (table.schema.metadata or {}).get(b"classnames")
        if missing or classnames is None:
            raise ValueError(
                f"{path}: needs columns image and label and the schema metadata key 'classnames' "
                f"(missing: {sorted(missing) or ''}{' classnames' if classnames is None else ''})"
            )
        self.path, self.transform = path, transform
        self.images = table.column("image").to_pylist()
        self.labels = table.column("label").to_pylist()
        self.classes = json.loads(classnames)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        return self.transform(image), self.labels[i]

    def where(self, i) -> str:
        return f"{self.path} row {i}"


SKIP_ADVICE = "fix or remove it, or set corrupt: skip on this dataset to leave such images out"
# corrupt: skip with the images to leave out given (found by the run's decode check): one that fails now did not then
LATE_ADVICE = "it decoded when this run checked the dataset: check the storage it is read from"


class Checked(Dataset):
    """Names the file of an image that fails to decode, instead of a bare PIL traceback."""

    def __init__(self, name: str, images: Dataset, where, advice: str = SKIP_ADVICE):
        self.name, self.images, self.where, self.advice = name, images, where, advice

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        try:
            return self.images[i]
        except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for a truncated or foreign file
            raise InputError(f"{self.name}: corrupt image {self.where(i)} ({first_line(exc)}); {self.advice}") from None


def _open(spec: DatasetSpec, transform) -> tuple[Dataset, list[str], list[Path], object]:
    """(images, class names, the files to fingerprint, index -> file description)."""
    root = Path(spec.root)
    if spec.kind in ("imagenet", "imagefolder"):
        images = tvd.ImageFolder(str(root / spec.split), transform=transform)
        if spec.kind == "imagenet":
            if len(images.classes) != len(IMAGENET_CLASSNAMES):
                raise InputError(
                    f"{spec.name}: found {len(images.classes)} class folders under "
                    f"{root / spec.split}, expected 1000 ({LOADERS['imagenet'].layout})"
                )
            classnames = list(IMAGENET_CLASSNAMES)
        else:
            classnames = [c.replace("_", " ") for c in images.classes]
        files = [Path(p) for p, _ in images.samples]
        return images, classnames, files, lambda i: files[i]
    if spec.kind == "sun397":
        images = tvd.SUN397(str(root), transform=transform)
        # torchvision lists the images in the file system's order (rglob), which differs between copies of the data
        # (each node's own): the shards of a cell index into this list, so it is put in one order, the paths'
        order = sorted(range(len(images._image_files)), key=lambda i: str(images._image_files[i]))
        images._image_files = [images._image_files[i] for i in order]
        images._labels = [images._labels[i] for i in order]
        files = list(images._image_files)
        return images, [c.replace("_", " ").replace("/", " ") for c in images.classes], files, lambda i: files[i]
    if spec.kind in ("dtd", "food101", "pets", "aircraft", "flowers102", "cars"):
        images = {
            "dtd": tvd.DTD,
            "food101": tvd.Food101,
            "pets": tvd.OxfordIIITPet,
            "aircraft": tvd.FGVCAircraft,
            "flowers102": tvd.Flowers102,
            "cars": tvd.StanfordCars,
        }[spec.kind](str(root), split=spec.split, transform=transform)
        if spec.kind == "flowers102":  # CLIP's names fix three of torchvision's ("pink-yellow dahlia?")
            return (
                images,
                clip_classnames("flowers"),
                [Path(f) for f in images._image_files],
                lambda i: images._image_files[i],
            )
        if spec.kind == "pets":
            files = [Path(f) for f in images._images]
        elif spec.kind == "cars":
            files = [Path(f) for f, _ in images._samples]
        else:
            files = [Path(f) for f in images._image_files]
        return images, [c.replace("_", " ") for c in images.classes], files, lambda i: files[i]
    if spec.kind == "pcam":
        images = tvd.PCAM(str(root), split=spec.split, transform=transform)
        folder = root / "pcam"
        files = sorted(folder.glob(f"camelyonpatch_level_2_split_{spec.split}_*.h5"))
        return images, clip_classnames("pcam"), files, lambda i: f"{files[0]} item {i}"
    if spec.kind == "eurosat":
        images = tvd.ImageFolder(str(root / "eurosat" / "2750"), transform=transform)
        files = [Path(p) for p, _ in images.samples]
        names = _curated(spec.name, "eurosat", images.classes)
        return images, [names[c] for c in images.classes], files, lambda i: files[i]
    if spec.kind == "caltech101":
        images = tvd.Caltech101(str(root), target_type="category", transform=transform)
        folder = root / "caltech101" / "101_ObjectCategories"
        files = [folder / images.categories[y] / f"image_{n:04d}.jpg" for y, n in zip(images.y, images.index)]
        # CLIP's list names every folder, the background too, which torchvision leaves out: matched by
        # folder, since by position every label would take its neighbour's name
        names = _curated(spec.name, "caltech101", sorted(p.name for p in folder.iterdir() if p.is_dir()))
        return images, [names[c] for c in images.categories], files, lambda i: files[i]
    if spec.kind == "caltech256":
        images = tvd.Caltech256(str(root), transform=transform)
        folder = root / "caltech256" / "256_ObjectCategories"
        files = [folder / images.categories[y] / f"{y + 1:03d}_{n:04d}.jpg" for y, n in zip(images.y, images.index)]
        # "001.ak47" -> "ak47", "253.faces-easy-101" -> "faces easy"
        names = [c.split(".", 1)[1].removesuffix("-101").replace("-", " ").replace("_", " ") for c in images.categories]
        return images, names, files, lambda i: files[i]
    if spec.kind == "parquet":
        images = ParquetImages(root / f"{spec.split}.parquet", transform)
        return images, images.classes, [images.path], images.where
    if spec.kind == "stl10":
        images = tvd.STL10(str(root), split=spec.split, transform=transform)
        folder = root / images.base_folder
    else:
        images = (tvd.CIFAR10 if spec.kind == "cifar10" else tvd.CIFAR100)(
            str(root), train=spec.split == "train", transform=transform, download=False
        )
        folder = root / images.base_folder
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return images, [c.replace("_", " ") for c in images.classes], files, lambda i: f"{folder} item {i}"


def undecodable(images: Dataset, indices: range) -> dict[int, str]:
    """index -> the error line (naming the file) of each image among `indices` that fails to decode."""
    failures = {}
    for i in indices:
        try:
            images[i]
        except InputError as exc:  # from Checked
            failures[i] = str(exc)
    return failures


def _from_root(spec: DatasetSpec, size: int) -> ClassificationData:
    size = LOADERS[spec.kind].native or size
    try:
        images, classnames, files, where = _open(spec, pixel_transform(size))
    except InputError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, IndexError, pa.ArrowException) as exc:
        # what torchvision's loaders and pyarrow raise for an empty, truncated or foreign dataset
        raise InputError(
            f"{spec.name}: cannot read {spec.kind} {spec.split} under {spec.root} "
            f"({first_line(exc)}); expected layout {LOADERS[spec.kind].layout}"
        ) from None
    if len(images) == 0:
        raise InputError(
            f"{spec.name}: no images in {spec.kind} {spec.split} under {spec.root}; expected layout "
            f"{LOADERS[spec.kind].layout}"
        )
    labels = known_labels(images)
    data = ClassificationData(
        spec.name,
        Checked(spec.name, images, where, SKIP_ADVICE if spec.skipped is None else LATE_ADVICE),
        classnames,
        [LOADERS[spec.kind].template],
        {"kind": spec.kind, "split": spec.split, "root": str(Path(spec.root).resolve()), "size": size},
        files,
    )
    data = _limited(data, spec, labels)  # before the scan for corrupt images: only the subset is decoded
    if spec.corrupt == "skip":
        found_here = spec.skipped is None
        bad = sorted(undecodable(data.images, range(len(data.images))) if found_here else spec.skipped)
        skipped = [str(where(data.images.indices[i] if isinstance(data.images, Subset) else i)) for i in bad]
        for file in skipped if found_here else ():
            print(f"{spec.name}: skipping corrupt image {file}", flush=True)
        if bad:
            data.identity["skipped"] = skipped
            left_out = set(bad)
            data.images = Subset(data.images, [i for i in range(len(data.images)) if i not in left_out])
    return data


def load_dataset(spec: DatasetSpec, size: int) -> ClassificationData:
    """size: the model's input size, which datasets attacked at their own resolution ignore."""
    problem = check_root(spec)
    if problem:
        raise FileNotFoundError(problem)
    data = _embedded(spec) if spec.kind == "embedded" else _from_root(spec, size)
    if spec.templates:
        data.templates = list(spec.templates)
    return data
