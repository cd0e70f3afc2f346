"""What a config may name, readable without importing torch, open_clip or pyarrow, so that a config
is checked in a moment: methods, attacks, architectures, dataset kinds and their on-disk layouts,
and the storage a cache may live on."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from agft_core import world


@dataclass(frozen=True)
class DatasetInfo:
    """What the driver needs to know of a dataset, read where the data is: no images."""

    name: str
    classnames: list[str]
    templates: list[str]
    identity: dict
    size: int


@dataclass(frozen=True)
class MethodSpec:
    """What the pipeline knows of a fine-tuning method. Its loss is a Method subclass in agft_core.methods;
    every other place (config, training loop, caches, logging) reads this row."""

    loss: str  # the name of its Method subclass in agft_core.methods
    frozen_encoder: bool  # a forward of the frozen teacher encoder per step
    teacher_cache: bool  # reads the frozen teacher's cached embeddings of the training set
    calibrated: bool  # γ and 1/τ shape its targets: its runs log the fitted calibration
    published: dict  # its authors' optimizer, lr, momentum, weight decay and training attack (train.recipe)
    loss_weights: tuple[float, float] | None = None  # its (α, β) defaults, as train.<name>.alpha / .beta
    weights_meaning: str = ""  # what α and β weigh, for the config reference
    needs_vit: bool = False  # reads the ViT's tokens (attention maps)
    # Set when its loss or training attack changes: enters its fine-tunes' cache key, so that an encoder trained
    # the old way is not found. Methods never revised have none, and their keys stay as they were.
    revision: str | None = None


def _recipe(optimizer: str, lr: float, weight_decay: float = 0.0, eps: float = 1 / 255, steps: int = 2) -> dict:
    return {
        "optimizer": optimizer,
        "lr": lr,
        "momentum": 0.9,
        "weight_decay": weight_decay,
        "attack": {"eps": eps, "alpha": 1 / 255, "steps": steps},
    }


# One row per method. Each published recipe's source is in docs/methods.md. The budget (epochs, batch size,
# warm-up) stays the config's, so that every method gets the same one.
# fmt: off
METHOD_SPECS = {
    "agft": MethodSpec("AGFT", frozen_encoder=False, teacher_cache=True, calibrated=True,
                       published=_recipe("sgd", 4e-4)),
    "tecoa": MethodSpec("TeCoA", frozen_encoder=False, teacher_cache=False, calibrated=False,
                        published=_recipe("sgd", 1e-5)),
    "pmg_aft": MethodSpec("PMGAFT", frozen_encoder=True, teacher_cache=False, calibrated=False,
                          published=_recipe("sgd", 5e-5), loss_weights=(1.0, 1.0),
                          weights_meaning="α: KL to the frozen model on x_adv; β: KL to the student on x",
                          revision="authors-final-2024-05-29"),
    "pmg_aft_scaled": MethodSpec("PMGAFTScaled", frozen_encoder=True, teacher_cache=False, calibrated=False,
                                 published=_recipe("sgd", 5e-5), loss_weights=(1.0, 1.0),
                                 weights_meaning="α: KL to the frozen model on x_adv; β: KL to the student on x"),
    "fare": MethodSpec("FARE", frozen_encoder=True, teacher_cache=False, calibrated=False,
                       published=_recipe("adamw", 1e-5, weight_decay=1e-4, eps=4 / 255, steps=10)),
    "tga_zsr": MethodSpec("TGAZSR", frozen_encoder=True, teacher_cache=False, calibrated=False,
                          published=_recipe("sgd", 1e-4), loss_weights=(0.08, 0.05), needs_vit=True,
                          weights_meaning="α: adversarial attention term; β: clean attention term"),
}
# fmt: on
METHODS = tuple(METHOD_SPECS)
RECIPE_FIELDS = tuple(METHOD_SPECS["agft"].published)  # the fields train.recipe: published sets
ATTACKS = ("pgd", "cw", "apgd-ce", "autoattack", "autoattack-rand")
# The number formats an evaluation may attack in: fp32 (TF32 off), tf32 (CUDA matrix products in TF32; the same as
# fp32 on a CPU), bf16 or fp16 (the encoder under autocast, as the TeCoA, PMG-AFT and TGA-ZSR scripts attack in fp16).
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
FIXED_STEP_ATTACKS = ("pgd", "cw")  # the attacks that take a step size α; APGD and AutoAttack adapt theirs
COUNTED_STEP_ATTACKS = ("pgd", "cw", "apgd-ce")  # the attacks that take a number of steps


def attack_key(name: str, eps: float, alpha: float | None, steps: int | None, restarts: int = 1) -> tuple:
    """(attack, ε, α, steps, restarts) with what the attack does not use set to None: equal attacks share
    their cached results whatever the config's unused fields say."""
    return (
        name,
        eps,
        alpha if name in FIXED_STEP_ATTACKS else None,
        steps if name in COUNTED_STEP_ATTACKS else None,
        restarts,
    )


# Robust accuracy as the paper counts it (the attacked image is classified correctly), and the
# stricter count that also requires the clean image to be.
ROBUST_DEFINITIONS = ("attacked", "clean_and_attacked")

EMBEDDED_ARCH_DIR = Path(__file__).parent / "model_configs"
EMBEDDED_ARCH = "agft-tiny-vit"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@cache
def _arch_configs() -> dict[str, Path]:
    """open_clip's architectures (the JSON files its registry is built from) and ours."""
    open_clip_dir = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    return {p.stem: p for folder in (open_clip_dir / "model_configs", EMBEDDED_ARCH_DIR) for p in folder.glob("*.json")}


def architectures() -> list[str]:
    return sorted(_arch_configs())


def missing_transformers(arch: str) -> bool:
    """Whether open_clip would build the arch's text tower or tokenizer with Hugging Face transformers (roberta,
    mt5, nllb, SigLIP's tokenizers), and transformers is not installed: it is no dependency of agft's."""
    text = json.loads(_arch_configs()[arch].read_text()).get("text_cfg", {})
    uses_it = bool(text.get("hf_model_name") or text.get("hf_tokenizer_name"))
    return uses_it and importlib.util.find_spec("transformers") is None


def has_vit_tower(arch: str) -> bool:
    """Whether the image tower is open_clip's own ViT (patch tokens and a projection), not a ResNet or timm."""
    vision = json.loads(_arch_configs()[arch].read_text()).get("vision_cfg", {}) if arch in _arch_configs() else {}
    return isinstance(vision.get("layers"), int) and not vision.get("timm_model_name")


def is_weights_file(weights: str) -> bool:
    return weights.endswith(WEIGHT_SUFFIXES) or "/" in weights


EMBEDDED_COUNTS = {"train": 6000, "test": 1000}
CLIP_TEMPLATE = "This is a photo of a {}."


@dataclass(frozen=True)
class Loader:
    splits: tuple[str, ...]
    layout: str  # what the root must contain, for error messages
    marker: str  # the path under <root> whose absence means a wrong root ({split} is filled in)
    # The paper's single prompt for this dataset, as the official AGFT code writes it (clip_dataset.py)
    template: str = CLIP_TEMPLATE
    # The images' own side in pixels when they are attacked at it, as the paper does for the small ones;
    # the model upsamples them inside. None: resized and cropped to the model's input, then attacked.
    native: int | None = None


LOADERS = {
    "imagenet": Loader(("train", "val"), "<root>/{train,val}/<wnid>/*.JPEG", "{split}"),
    "cifar10": Loader(
        ("train", "test"),
        "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "cifar-10-batches-py",
        native=32,
    ),
    "cifar100": Loader(("train", "test"), "<root>/cifar-100-python/{train,test,meta}", "cifar-100-python", native=32),
    "stl10": Loader(
        ("train", "test"), "<root>/stl10_binary/{train,test}_{X,y}.bin + class_names.txt", "stl10_binary", native=96
    ),
    "dtd": Loader(
        ("train", "val", "test"),
        "<root>/dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt}",
        "dtd/dtd/labels",
        "A surface with a {} texture.",
    ),
    "food101": Loader(
        ("train", "test"),
        "<root>/food-101/{images/<class>/<id>.jpg, meta/{train,test}.json}",
        "food-101/meta",
        "A photo of {}, a type of food.",
    ),
    "pets": Loader(
        ("trainval", "test"),
        "<root>/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}",
        "oxford-iiit-pet/annotations",
        "A photo of a {}, a type of pet.",
    ),
    "aircraft": Loader(
        ("train", "val", "trainval", "test"),
        "<root>/fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, images_variant_<split>.txt}",
        "fgvc-aircraft-2013b/data",
        "A photo of a {}, a type of aircraft.",
    ),
    "eurosat": Loader(
        ("all",), "<root>/eurosat/2750/<Class>/*.jpg", "eurosat/2750", "A centered satellite photo of {}."
    ),
    "caltech101": Loader(
        ("all",),
        "<root>/caltech101/101_ObjectCategories/<category>/*.jpg",
        "caltech101/101_ObjectCategories",
        "A photo of a {}.",
    ),
    "caltech256": Loader(
        ("all",),
        "<root>/caltech256/256_ObjectCategories/<NNN.category>/<NNN>_<nnnn>.jpg",
        "caltech256/256_ObjectCategories",
        "A photo of a {}.",
    ),
    "sun397": Loader(("all",), "<root>/SUN397/{ClassName.txt, <letter>/<category>/sun_*.jpg}", "SUN397/ClassName.txt"),
    "flowers102": Loader(
        ("train", "val", "test"),
        "<root>/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}",
        "flowers-102/setid.mat",
        "A photo of a {}, a type of flower.",
    ),
    "cars": Loader(
        ("train", "test"),
        "<root>/stanford_cars/{devkit/{cars_meta.mat,cars_train_annos.mat}, cars_train/, "
        "cars_test_annos_withlabels.mat, cars_test/}",
        "stanford_cars/devkit/cars_meta.mat",
        "A photo of a {}.",
    ),
    "pcam": Loader(
        ("train", "val", "test"),
        "<root>/pcam/camelyonpatch_level_2_split_<split>_{x,y}.h5",
        "pcam/camelyonpatch_level_2_split_{split}_y.h5",
        "This is a photo of {}.",
    ),
    "imagefolder": Loader(("train", "val", "test"), "<root>/<split>/<class name>/*.{jpg,png}", "{split}"),
    "parquet": Loader(
        ("train", "val", "test"),
        "<root>/<split>.parquet with columns image (encoded bytes) and "
        "label (int), class names in the schema metadata key 'classnames' (JSON list)",
        "{split}.parquet",
    ),
}
KINDS = ("embedded", *LOADERS)


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    name: str
    split: str
    root: str | None = None
    limit: int | None = None  # a random subset of this many images, stratified by class where labels are known
    world_seed: int = 0
    templates: tuple[str, ...] | None = None  # overrides the dataset's own prompt templates
    corrupt: str = "error"  # or "skip": leave out images that fail to decode
    subset_seed: int = 0  # which random subset `limit` takes: the same for every model and method of a run
    # With corrupt: skip, the images left out (indices into the subset `limit` takes), found once by the pipeline's
    # describe stage so that no process that loads the dataset decodes all of it first; None: load_dataset finds them.
    skipped: tuple[int, ...] | None = None


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
    loader = LOADERS[spec.kind]
    expected = Path(spec.root) / loader.marker.format(split=spec.split)
    if not expected.exists():
        return f"{spec.name}: {expected} not found; expected layout {loader.layout}"
    return None


URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(location: str) -> bool:
    return "://" in location


def check_location(location: str) -> str | None:
    """Why `location` can't hold caches or checkpoints, or None."""
    scheme = location.partition("://")[0] if is_uri(location) else "file"
    if scheme not in URI_SCHEMES:
        return f"unsupported URI scheme {scheme}://; use a local path or one of " + ", ".join(
            f"{s}://" for s in URI_SCHEMES
        )
    return None
