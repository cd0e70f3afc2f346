"""The embedded offline world: generated, captioned images of coloured shapes.

Nothing here is downloaded. Every image is drawn from a seed, so a dataset is fully
determined by (name, split, seed, count). Each image composes independent attributes
(shape, colour, background texture, position, size); captions name random subsets of
them, which is what lets a CLIP pretrained on this corpus classify any single attribute
zero-shot. Each (dataset, split) draws from its own seed stream, so the zero-shot suite
never shares an image with pretraining or fine-tuning.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
GENERATOR_VERSION = "world-v1"

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "bar")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 230),
    "yellow": (240, 220, 30), "cyan": (40, 220, 220), "magenta": (220, 40, 200),
    "orange": (250, 140, 20), "white": (250, 250, 250),
}
BACKGROUNDS = ("plain", "striped", "checkered", "noisy")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")

# Captions name each attribute with probability CAPTION_MENTION, in one fixed word order,
# inside one of a few frames. The zero-shot templates below are such captions with one
# attribute named, so the text tower has seen every word of every prompt in pretraining.
CAPTION_FRAMES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
CAPTION_MENTION = 0.5


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    said = {k: rng.random() < CAPTION_MENTION for k in attrs}
    words = [attrs[k] for k in ("size", "colour") if said[k]]
    words.append(attrs["shape"] if said["shape"] else "shape")
    if said["background"]:
        words.append(f"on a {attrs['background']} background")
    if said["position"]:
        words.append(f"in the {attrs['position']}")
    return CAPTION_FRAMES[rng.integers(len(CAPTION_FRAMES))].format(" ".join(words))


@dataclass(frozen=True)
class TaskSpec:
    """One classification task of the world: which attribute is the label, and its prompt."""

    attribute: str
    classnames: tuple[str, ...]
    template: str


TASKS = {
    "shapes": TaskSpec("shape", SHAPES, "a photo of a {}."),
    "colours": TaskSpec("colour", tuple(COLOURS), "a photo of a {} shape."),
    "backgrounds": TaskSpec("background", BACKGROUNDS, "a picture of a shape on a {} background."),
    "positions": TaskSpec("position", POSITIONS, "an image of a shape in the {}."),
    "sizes": TaskSpec("size", SIZES, "a photo of a {} shape."),
}
SPLITS = ("pretrain", "train", "test")


@dataclass(frozen=True)
class WorldData:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]; -1 for the caption-only pretraining corpus
    captions: list[str]


def _stream_seed(seed: int, name: str, split: str) -> int:
    digest = hashlib.sha256(f"{GENERATOR_VERSION}/{seed}/{name}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _background(rng: np.random.Generator, kind: str) -> np.ndarray:
    base = rng.uniform(40, 140)
    tint = rng.uniform(-15, 15, size=3)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), base, np.float32) + tint
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if kind == "striped":
        period = rng.integers(4, 7)
        img += 45 * (((xx + yy * rng.integers(0, 2)) // (period // 2)) % 2)[..., None]
    elif kind == "checkered":
        cell = rng.integers(3, 6)
        img += 45 * (((xx // cell) + (yy // cell)) % 2)[..., None]
    elif kind == "noisy":
        img += rng.normal(0, 28, size=img.shape)
    return img


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float):
    def ring_points(n, radius, phase=0.0):
        return [(cx + radius * math.cos(phase + angle + 2 * math.pi * k / n),
                 cy + radius * math.sin(phase + angle + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "square":
        return ring_points(4, r, math.pi / 4)
    if shape == "diamond":
        return ring_points(4, r)
    if shape == "triangle":
        return ring_points(3, r, -math.pi / 2)
    if shape == "star":
        outer, inner = ring_points(5, r, -math.pi / 2), ring_points(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(shape)


def _draw_shape(img: np.ndarray, rng: np.random.Generator, shape: str, colour, position: str, size: str):
    r = rng.uniform(4.0, 5.5) if size == "small" else rng.uniform(7.5, 9.5)
    quarter = IMAGE_SIZE / 4
    cx = quarter * (3 if "right" in position else 1) + rng.uniform(-2, 2)
    cy = quarter * (3 if "bottom" in position else 1) + rng.uniform(-2, 2)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(2, round(r / 3))
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=width)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - width / 2, cx + r, cy + width / 2), fill=255)
        draw.rectangle((cx - width / 2, cy - r, cx + width / 2, cy + r), fill=255)
    elif shape == "bar":
        draw.rectangle((cx - r, cy - width / 2, cx + r, cy + width / 2), fill=255)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, rng.uniform(-0.25, 0.25)), fill=255)
    mask = np.asarray(canvas, np.float32)[..., None] / 255.0
    shade = np.asarray(colour, np.float32) * rng.uniform(0.85, 1.0)
    return img * (1 - mask) + shade * mask


def _sample(rng: np.random.Generator) -> dict[str, str]:
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": tuple(COLOURS)[rng.integers(len(COLOURS))],
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
        "size": SIZES[rng.integers(len(SIZES))],
    }


def render(attrs: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    img = _background(rng, attrs["background"])
    img = _draw_shape(img, rng, attrs["shape"], COLOURS[attrs["colour"]], attrs["position"], attrs["size"])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate(name: str, split: str, count: int, seed: int) -> WorldData:
    """Images for one task and split, or captioned images for name='corpus', split='pretrain'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name != "corpus" and name not in TASKS:
        raise ValueError(f"unknown embedded dataset {name!r}; valid: {sorted(TASKS)}")
    rng = np.random.default_rng(_stream_seed(seed, name, split))
    task = TASKS.get(name)
    images, labels, captions = [], [], []
    for _ in range(count):
        attrs = _sample(rng)
        images.append(render(attrs, rng))
        captions.append(caption(attrs, rng))
        labels.append(task.classnames.index(attrs[task.attribute]) if task else -1)
    return WorldData(np.stack(images), np.asarray(labels, np.int64), captions)
