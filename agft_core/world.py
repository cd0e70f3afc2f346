"""The embedded offline world: generated, captioned images, and real handwritten digits.

Nothing here is downloaded. Three kinds of scene make up the world:

- a coloured shape on a textured background (shape, colour, background, position, size);
- a digit or letter glyph drawn with one of the DejaVu fonts that matplotlib ships, in a
  colour, near the centre of a plain background (glyph, colour, size);
- a real handwritten digit from scikit-learn's bundled copy of the UCI digits.

Captions name random subsets of a scene's attributes, which is what lets a CLIP pretrained
on this corpus classify any single attribute zero-shot. Generated images come from a seed:
each (dataset, split) draws from its own seed stream, so the zero-shot suite never shares an
image with pretraining or fine-tuning. The handwritten digits are partitioned once per world
seed into disjoint pretrain / train / test pools.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 32
GENERATOR_VERSION = "world-v2"

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "bar")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "cyan": (40, 220, 220),
    "magenta": (220, 40, 200),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
BACKGROUNDS = ("plain", "striped", "checkered", "noisy")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Upper-case glyphs named by their lower-case letter: CLIP's tokenizer lower-cases every prompt.
LETTERS = ("a", "b", "e", "h", "k", "m", "r", "s", "t", "x")
GLYPHS = {"digit": {name: str(i) for i, name in enumerate(DIGITS)}, "letter": {name: name.upper() for name in LETTERS}}
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans.ttf")
# What the pretraining corpus is made of; the shapes stay the bulk, as the fine-tuning task is theirs.
CORPUS_MIX = {"shape": 0.5, "digit": 0.2, "letter": 0.2, "handwritten": 0.1}
# Glyphs are drawn near the centre of a plain background. Anywhere on any texture, the 10-epoch
# teacher could not tell them apart (measured: 19 % and 21 % zero-shot on digits and letters).
GLYPH_JITTER = 3
# Handwritten digits per split; the rest of the 1797 go to the pretraining corpus.
HANDWRITTEN_POOLS = {"test": 500, "train": 300}

# Captions name each attribute with probability CAPTION_MENTION, except what the object is
# (its shape or glyph), named with IDENTITY_MENTION: at 0.5 the 10-epoch teacher knew the shapes,
# the fine-tuning task, at only 31-38 % (2.5-3x chance), and AGFT's targets are the teacher's
# predictions. Words come in one fixed order, inside one of a few frames. The zero-shot
# templates below are such captions with one attribute named, so the text tower has seen
# every prompt in pretraining (tested).
CAPTION_FRAMES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
CAPTION_MENTION = 0.5
IDENTITY_MENTION = 0.9


@dataclass(frozen=True)
class TaskSpec:
    """One classification task of the world: which scene it shows, the class name of an image (a format over the
    scene's attributes), the class names and the prompt."""

    scene: str  # "shape", "digit", "letter" or "handwritten"
    label: str  # e.g. "{colour}"
    classnames: tuple[str, ...]
    template: str

    def label_of(self, attrs: dict) -> int:
        return self.classnames.index(self.label.format(**attrs))


# A scene's colour, shape and background as a caption names them: 256 classes, so that a soft target over the
# training classes spans the embedding as ImageNet's 1000 do (the 8 shapes constrain at most 7 directions).
SCENE = "{colour} {shape} on a {background} background"
SCENES = tuple(SCENE.format(colour=c, shape=s, background=b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS)

TASKS = {
    "shapes": TaskSpec("shape", "{shape}", SHAPES, "a photo of a {}."),
    "scenes": TaskSpec("shape", SCENE, SCENES, "a photo of a {}."),
    "colours": TaskSpec("shape", "{colour}", tuple(COLOURS), "a photo of a {} shape."),
    "backgrounds": TaskSpec("shape", "{background}", BACKGROUNDS, "a picture of a shape on a {} background."),
    "positions": TaskSpec("shape", "{position}", POSITIONS, "an image of a shape in the {}."),
    "sizes": TaskSpec("shape", "{size}", SIZES, "a photo of a {} shape."),
    "digits": TaskSpec("digit", "{glyph}", DIGITS, "a photo of a digit {}."),
    "letters": TaskSpec("letter", "{glyph}", LETTERS, "a picture of a letter {}."),
    "handwritten": TaskSpec("handwritten", "{glyph}", DIGITS, "a photo of a handwritten digit {}."),
}
SPLITS = ("pretrain", "train", "test")
# The world's "ImageNet" (fine-tuned on; its test split is scored like the paper scores ImageNet val)
# and its zero-shot suite: tasks never fine-tuned on. Letters are classes the fine-tuning never saw;
# the handwritten digits are real scans. `sizes` stays out: with two classes, chance is 50 %, and
# the suite asks the teacher for at least twice chance.
FINE_TUNING_TASK = "shapes"
ZERO_SHOT_SUITE = ("colours", "backgrounds", "positions", "digits", "letters", "handwritten")
UNCAPTIONED = ("scene", "index")  # attributes that steer rendering but are never written in a caption


@dataclass(frozen=True)
class WorldData:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]; -1 for the caption-only pretraining corpus
    captions: list[str]


def caption(attrs: dict, rng: np.random.Generator) -> str:
    said = {
        k: rng.random() < (IDENTITY_MENTION if k in ("shape", "glyph") else CAPTION_MENTION)
        for k in attrs
        if k not in UNCAPTIONED
    }
    scene = attrs["scene"]
    words = [attrs[k] for k in ("size", "colour") if said.get(k)]
    if scene == "shape":
        words.append(attrs["shape"] if said["shape"] else "shape")
    else:
        words.append("handwritten digit" if scene == "handwritten" else scene)
        if said["glyph"]:
            words.append(attrs["glyph"])
    if said.get("background"):
        words.append(f"on a {attrs['background']} background")
    if said.get("position"):
        words.append(f"in the {attrs['position']}")
    return CAPTION_FRAMES[rng.integers(len(CAPTION_FRAMES))].format(" ".join(words))


def _stream_seed(seed: int, name: str, split: str) -> int:
    digest = hashlib.sha256(f"{GENERATOR_VERSION}/{seed}/{name}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / name), size)


@functools.cache
def _handwritten() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (16 grey levels) and their labels, read from its data file as its
    load_digits() reads it, without importing sklearn: that import cost every driver 1.4 s (2026-12-07)."""
    sklearn = Path(importlib.util.find_spec("sklearn").origin).parent
    rows = np.loadtxt(sklearn / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)


def handwritten_pools(seed: int) -> dict[str, np.ndarray]:
    """Disjoint indices of the handwritten digits for each split, drawn once per world seed."""
    order = np.random.default_rng(_stream_seed(seed, "handwritten", "pools")).permutation(len(_handwritten()[1]))
    test, train = HANDWRITTEN_POOLS["test"], HANDWRITTEN_POOLS["train"]
    return {"test": order[:test], "train": order[test : test + train], "pretrain": order[test + train :]}


@functools.cache
def fingerprint() -> str:
    """Everything generated images depend on besides the seed: the generator, the font files,
    the handwritten digits and the font renderer."""
    from PIL import __version__ as pillow
    from PIL import features

    h = hashlib.sha256(f"{GENERATOR_VERSION}/{pillow}/{features.version('freetype2')}".encode())
    for name in FONTS:
        h.update((_font_dir() / name).read_bytes())
    for array in _handwritten():
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


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
        return [
            (
                cx + radius * math.cos(phase + angle + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + angle + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

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


def _shape_mask(rng: np.random.Generator, shape: str, position: str, size: str) -> Image.Image:
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
    return canvas


def _glyph_mask(rng: np.random.Generator, char: str, size: str) -> Image.Image:
    pixels = int(rng.integers(16, 20) if size == "small" else rng.integers(24, 29))
    font = _font(FONTS[rng.integers(len(FONTS))], pixels)
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-GLYPH_JITTER, GLYPH_JITTER, size=2)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    ImageDraw.Draw(canvas).text((cx, cy), char, font=font, fill=255, anchor="mm")
    return canvas


def _handwritten_image(index: int) -> np.ndarray:
    """The 8x8 scan upsampled to 24x24 and centred on black, its 16 grey levels spread over 0-255."""
    grey = Image.fromarray(np.rint(_handwritten()[0][index] * 255 / 16).astype(np.uint8), "L")
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas.paste(grey.resize((24, 24), Image.Resampling.BICUBIC), (4, 4))
    return np.asarray(canvas.convert("RGB"))


def _scan(index: int) -> dict:
    return {"scene": "handwritten", "glyph": DIGITS[_handwritten()[1][index]], "index": int(index)}


def _sample(scene: str, rng: np.random.Generator, pool: np.ndarray) -> dict:
    if scene == "handwritten":
        return _scan(pool[rng.integers(len(pool))])
    attrs = {"scene": scene}
    if scene == "shape":
        attrs["shape"] = SHAPES[rng.integers(len(SHAPES))]
    else:
        attrs["glyph"] = tuple(GLYPHS[scene])[rng.integers(len(GLYPHS[scene]))]
    attrs["colour"] = tuple(COLOURS)[rng.integers(len(COLOURS))]
    attrs["background"] = BACKGROUNDS[rng.integers(len(BACKGROUNDS))] if scene == "shape" else "plain"
    if scene == "shape":
        attrs["position"] = POSITIONS[rng.integers(len(POSITIONS))]
    attrs["size"] = SIZES[rng.integers(len(SIZES))]
    return attrs


def render(attrs: dict, rng: np.random.Generator) -> np.ndarray:
    if attrs["scene"] == "handwritten":
        return _handwritten_image(attrs["index"])
    img = _background(rng, attrs["background"])
    if attrs["scene"] == "shape":
        mask = _shape_mask(rng, attrs["shape"], attrs["position"], attrs["size"])
    else:
        mask = _glyph_mask(rng, GLYPHS[attrs["scene"]][attrs["glyph"]], attrs["size"])
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    shade = np.asarray(COLOURS[attrs["colour"]], np.float32) * rng.uniform(0.85, 1.0)
    return np.clip(np.rint(img * (1 - alpha) + shade * alpha), 0, 255).astype(np.uint8)


def generate(name: str, split: str, count: int, seed: int) -> WorldData:
    """Images for one task and split, or captioned images for name='corpus', split='pretrain'.
    A handwritten split holds each of its pool's digits at most once, so it may return fewer."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name != "corpus" and name not in TASKS:
        raise ValueError(f"unknown embedded dataset {name!r}; valid: {sorted(TASKS)}")
    rng = np.random.default_rng(_stream_seed(seed, name, split))
    task = TASKS.get(name)
    pool = handwritten_pools(seed)[split]
    if task and task.scene == "handwritten":
        scenes = [_scan(i) for i in pool[:count]]
    else:
        kinds, weights = list(CORPUS_MIX), list(CORPUS_MIX.values())
        scenes = [
            _sample(task.scene if task else kinds[rng.choice(len(kinds), p=weights)], rng, pool) for _ in range(count)
        ]
    images, labels, captions = [], [], []
    for attrs in scenes:
        images.append(render(attrs, rng))
        captions.append(caption(attrs, rng))
        labels.append(task.label_of(attrs) if task else -1)
    return WorldData(np.stack(images), np.asarray(labels, np.int64), captions)
