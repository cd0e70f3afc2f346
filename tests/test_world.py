import hashlib
import shutil

import numpy as np
import pytest
import torch

from agft_core import world
from agft_core.catalog import DatasetSpec
from agft_core.datasets import load_dataset


def digest(images) -> set[str]:
    return {hashlib.sha256(i.tobytes()).hexdigest() for i in images}


@pytest.mark.parametrize("name", ["corpus", "digits", "letters", "handwritten", "colours"])
def test_same_seed_gives_byte_identical_images_and_other_seed_does_not(name):
    split = "pretrain" if name == "corpus" else "test"
    a, b = world.generate(name, split, 40, seed=3), world.generate(name, split, 40, seed=3)
    c = world.generate(name, split, 40, seed=4)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert a.images.tobytes() != c.images.tobytes()


def test_zero_shot_images_never_appear_in_pretraining_or_fine_tuning():
    seen = digest(world.generate("corpus", "pretrain", 6000, 0).images) | digest(
        world.generate(world.FINE_TUNING_TASK, "train", 2000, 0).images
    )
    for name in world.ZERO_SHOT_SUITE:
        test = digest(world.generate(name, "test", 300, 0).images)
        assert len(test) > 250 and not test & seen, name


def test_handwritten_pools_partition_the_scans_and_the_corpus_draws_only_its_own():
    pools = world.handwritten_pools(0)
    indices = np.concatenate(list(pools.values()))
    assert len(indices) == len(set(indices.tolist())) == 1797  # disjoint and all of sklearn's digits
    scans = {i: hashlib.sha256(world._handwritten_image(i).tobytes()).hexdigest() for i in range(1797)}
    corpus = world.generate("corpus", "pretrain", 3000, 0)
    drawn = digest(image for image, text in zip(corpus.images, corpus.captions) if "handwritten" in text)
    assert len(drawn) > 100 and drawn <= {scans[i] for i in pools["pretrain"]}
    test = world.generate("handwritten", "test", 10_000, 0)  # asks for more than the pool holds
    assert len(test.images) == len(pools["test"]) == len(digest(test.images))  # each scan once
    from sklearn.datasets import load_digits

    assert test.labels.tolist() == load_digits().target[pools["test"]].tolist()


def test_suite_is_six_tasks_other_than_fine_tuning_one_with_unseen_classes():
    suite = world.ZERO_SHOT_SUITE
    assert len(suite) >= 6 and world.FINE_TUNING_TASK not in suite
    assert all(len(world.TASKS[n].classnames) >= 3 for n in suite)  # else twice chance is out of reach
    tuned = set(world.TASKS[world.FINE_TUNING_TASK].classnames)
    assert not set(world.TASKS["letters"].classnames) & tuned and len({world.TASKS[n].template for n in suite}) >= 4


@pytest.mark.parametrize("name", sorted(world.TASKS))
def test_labels_match_the_declared_classes_and_templates(name):
    task = world.TASKS[name]
    data = load_dataset(DatasetSpec("embedded", name, "test", limit=64), size=32)
    assert data.classnames == list(task.classnames) and data.templates == [task.template]
    labels = torch.tensor([int(y) for _, y in data.images])
    assert labels.min() >= 0 and labels.max() < len(task.classnames)
    x, _ = data.images[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


@pytest.fixture(scope="module")
def demo_captions() -> set[str]:
    return set(world.generate("corpus", "pretrain", 20000, 0).captions)  # the demo's corpus


@pytest.mark.parametrize("name", world.ZERO_SHOT_SUITE)
def test_every_prompt_is_a_caption_the_text_tower_saw_in_pretraining(name, demo_captions):
    captions = demo_captions
    task = world.TASKS[name]
    missing = [c for c in task.classnames if task.template.format(c) not in captions]
    assert not missing, f"{name}: prompts never captioned: {missing}"


def _shows_colour(image: np.ndarray, colour: str) -> bool:
    rgb = np.asarray(world.COLOURS[colour], np.float32)
    distance = np.abs(image.astype(np.float32) - rgb).sum(-1)
    return (distance < 0.16 * rgb.sum() + 10).sum() >= 10  # shapes are shaded to 85-100% of their colour


def test_colour_label_is_the_colour_drawn():
    data = world.generate("colours", "test", 50, 0)
    for image, label in zip(data.images, data.labels):
        assert _shows_colour(image, world.TASKS["colours"].classnames[label])


def test_scenes_are_every_colour_shape_and_background_and_each_label_names_what_is_drawn():
    task = world.TASKS["scenes"]
    assert len(set(task.classnames)) == len(world.COLOURS) * len(world.SHAPES) * len(world.BACKGROUNDS) == 256
    data = world.generate("scenes", "test", 2000, 0)
    assert len(set(data.labels.tolist())) > 250  # 2000 uniform draws of 256 classes miss ~0.1 of them
    plain = 0
    for image, label in zip(data.images[:100], data.labels[:100]):
        name = task.classnames[label]
        assert _shows_colour(image, name.split()[0]), name
        # the border is the background's, a shape covering little of it: mostly one colour on a plain one, no
        # colour on half of it on a noisy one
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        _, counts = np.unique(border, axis=0, return_counts=True)
        if name.endswith("on a plain background"):
            assert counts.max() > 0.75 * len(border), name
            plain += 1
        if name.endswith("on a noisy background"):
            assert counts.max() < 0.5 * len(border), name
    assert 10 < plain < 50


def test_fingerprint_follows_the_font_files(tmp_path, monkeypatch):
    world.fingerprint.cache_clear()
    real = world.fingerprint()
    for name in world.FONTS:
        shutil.copy(world._font_dir() / name, tmp_path / name)
    world.fingerprint.cache_clear()
    monkeypatch.setattr(world, "_font_dir", lambda: tmp_path)
    same = world.fingerprint()
    with open(tmp_path / world.FONTS[0], "ab") as font:
        font.write(b"\0")
    world.fingerprint.cache_clear()
    changed = world.fingerprint()
    world.fingerprint.cache_clear()
    assert same == real and changed != same


def test_world_command_draws_every_task_into_a_png(tmp_path):
    from PIL import Image

    from pipeline.cli import main

    out = tmp_path / "world.png"
    assert main(["world", "--out", str(out)]) == 0
    with Image.open(out) as image:
        width, height = image.size
    assert image.format == "PNG" and height > width * (len(world.TASKS) + 1) / 8 * 0.8  # one row per task + corpus
