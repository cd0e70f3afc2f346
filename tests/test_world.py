import hashlib

import numpy as np
import pytest
import torch

from agft_core import world
from agft_core.datasets import DatasetSpec, load_dataset


def test_same_seed_gives_byte_identical_images_and_other_seed_does_not():
    a, b = world.generate("colours", "test", 40, seed=3), world.generate("colours", "test", 40, seed=3)
    c = world.generate("colours", "test", 40, seed=4)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert a.images.tobytes() != c.images.tobytes()


def test_zero_shot_images_never_appear_in_pretraining_or_fine_tuning():
    digest = lambda imgs: {hashlib.sha256(i.tobytes()).hexdigest() for i in imgs}
    seen = digest(world.generate("corpus", "pretrain", 2000, 0).images) | digest(
        world.generate("shapes", "train", 2000, 0).images)
    for name in world.TASKS:
        assert not digest(world.generate(name, "test", 300, 0).images) & seen


@pytest.mark.parametrize("name", sorted(world.TASKS))
def test_labels_match_the_rendered_attribute_and_declared_classes(name):
    task = world.TASKS[name]
    data = load_dataset(DatasetSpec("embedded", name, "test", limit=64), size=32)
    assert data.classnames == list(task.classnames) and data.templates == [task.template]
    labels = torch.tensor([int(y) for _, y in data.images])
    assert labels.min() >= 0 and labels.max() < len(task.classnames)
    x, _ = data.images[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_colour_label_is_the_colour_drawn():
    data = world.generate("colours", "test", 50, 0)
    for image, label in zip(data.images, data.labels):
        rgb = np.asarray(world.COLOURS[world.TASKS["colours"].classnames[label]], np.float32)
        distance = np.abs(image.astype(np.float32) - rgb).sum(-1)
        # shapes are shaded to 85-100% of their colour
        assert (distance < 0.16 * rgb.sum() + 10).sum() >= 10


def test_world_command_draws_every_task_into_a_png(tmp_path):
    from PIL import Image

    from pipeline.cli import main
    from agft_core import world

    out = tmp_path / "world.png"
    assert main(["world", "--out", str(out)]) == 0
    with Image.open(out) as image:
        width, height = image.size
    assert image.format == "PNG" and height > width * (len(world.TASKS) + 1) / 8 * 0.8  # one row per task + corpus
