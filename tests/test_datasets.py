"""Real dataset loaders on tiny files written in each dataset's own on-disk format."""

import io
import json
import os
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd

from agft_core.catalog import LOADERS, DatasetSpec, check_root
from agft_core.datasets import _clip_benchmark_classnames, clip_classnames, load_dataset
from agft_core.errors import InputError
from agft_core.subsets import subset_indices

RNG = np.random.default_rng(0)


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the published archives' MD5s; generated stand-ins cannot match them."""
    for cls in (tvd.CIFAR10, tvd.CIFAR100, tvd.STL10):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    for module in (tvd.cifar, tvd.flowers102):
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def _pixels(n, side):
    return RNG.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _jpeg(path, side=8, colour=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(1, side)[0] if colour is None else np.full((side, side, 3), colour, np.uint8)).save(path)


def _check(data, n, classnames, template, side=16):
    assert len(data) == n and data.classnames == classnames and data.templates == [template]
    x, y = data.images[0]
    assert x.shape == (3, side, side) and 0 <= x.min() and x.max() <= 1 and 0 <= int(y) < len(classnames)


@pytest.mark.parametrize(
    "kind, folder, labels_key, names_key, meta",
    [
        ("cifar10", "cifar-10-batches-py", "labels", "label_names", "batches.meta"),
        ("cifar100", "cifar-100-python", "fine_labels", "fine_label_names", "meta"),
    ],
)
def test_cifar_pickles(tmp_path, no_md5, kind, folder, labels_key, names_key, meta):
    base = tmp_path / folder
    base.mkdir()
    names = ["apple", "maple_tree", "bus"]
    files = ["test_batch"] if kind == "cifar10" else ["test"]
    for name in files:
        labels = [0, 1, 2, 1, 0]
        data = _pixels(5, 32).transpose(0, 3, 1, 2).reshape(5, -1)  # CIFAR's row layout: R plane, G, B
        (base / name).write_bytes(pickle.dumps({"data": data, labels_key: labels}))
    (base / meta).write_bytes(pickle.dumps({names_key: names}))
    data = load_dataset(DatasetSpec(kind, kind, "test", str(tmp_path)), 16)
    _check(data, 5, ["apple", "maple tree", "bus"], "This is a photo of a {}.", side=32)  # attacked at 32 px
    assert [int(data.images[i][1]) for i in range(5)] == [0, 1, 2, 1, 0]


def test_stl10_binaries(tmp_path, no_md5):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    pixels = RNG.integers(0, 256, (4, 3, 96, 96), dtype=np.uint8)
    pixels.transpose(0, 1, 3, 2).tofile(base / "test_X.bin")  # STL10 stores each plane column-major
    np.array([1, 3, 2, 3], np.uint8).tofile(base / "test_y.bin")  # labels are 1-based on disk
    (base / "class_names.txt").write_text("airplane\nbird\ncar\n")
    data = load_dataset(DatasetSpec("stl10", "stl10", "test", str(tmp_path)), 16)
    _check(data, 4, ["airplane", "bird", "car"], "This is a photo of a {}.", side=96)  # attacked at 96 px
    assert [int(data.images[i][1]) for i in range(4)] == [0, 2, 1, 2]


def test_dtd_reads_its_split_file(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    for cls in ("banded", "zigzagged"):
        for i in range(3):
            _jpeg(base / "images" / cls / f"{cls}_{i}.jpg")
    (base / "labels").mkdir()
    (base / "labels" / "test1.txt").write_text("banded/banded_0.jpg\nzigzagged/zigzagged_2.jpg\n")
    data = load_dataset(DatasetSpec("dtd", "dtd", "test", str(tmp_path)), 16)
    _check(data, 2, ["banded", "zigzagged"], "A surface with a {} texture.")


def test_imagenet_folder_layout_uses_open_clip_class_names(tmp_path):
    from open_clip import IMAGENET_CLASSNAMES

    for i in range(1000):
        _jpeg(tmp_path / "val" / f"n{i:08d}" / "a.JPEG", side=4)
    data = load_dataset(DatasetSpec("imagenet", "imagenet", "val", str(tmp_path)), 16)
    _check(data, 1000, list(IMAGENET_CLASSNAMES), "This is a photo of a {}.")
    (tmp_path / "val" / "n00000000" / "a.JPEG").unlink()
    (tmp_path / "val" / "n00000000").rmdir()
    with pytest.raises(ValueError, match="found 999 class folders"):
        load_dataset(DatasetSpec("imagenet", "imagenet", "val", str(tmp_path)), 16)


def test_parquet_dataset_of_encoded_images(tmp_path):
    encoded = []
    for colour in ([255, 0, 0], [0, 0, 255], [255, 0, 0]):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    table = pa.table({"image": encoded, "label": [0, 1, 0]})
    table = table.replace_schema_metadata({"classnames": json.dumps(["red", "blue"])})
    pq.write_table(table, tmp_path / "test.parquet")
    data = load_dataset(DatasetSpec("parquet", "mine", "test", str(tmp_path)), 16)
    _check(data, 3, ["red", "blue"], "This is a photo of a {}.")
    x, y = data.images[1]
    assert int(y) == 1 and torch.allclose(x[2], torch.ones(16, 16)) and x[0].max() == 0


def test_corrupt_image_is_named_and_skipped_only_when_asked(tmp_path, capsys):
    for cls in ("cat", "dog"):
        _jpeg(tmp_path / "test" / cls / "ok.png")
    broken = tmp_path / "test" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = load_dataset(DatasetSpec("imagefolder", "pets", "test", str(tmp_path)), 16)
    with pytest.raises(ValueError, match=f"pets: corrupt image {broken}"):
        [data.images[i] for i in range(len(data))]
    skipped = load_dataset(DatasetSpec("imagefolder", "pets", "test", str(tmp_path), corrupt="skip"), 16)
    assert len(skipped) == 2 and skipped.identity["skipped"] == [str(broken)]
    assert f"pets: skipping corrupt image {broken}" in capsys.readouterr().out


def test_corrupt_skip_is_decided_once_and_every_process_leaves_out_the_same_images(ray_local, tmp_path):
    """The describe stage scans a corrupt: skip dataset once, in Ray tasks, and names what it leaves out in the spec
    every task loads: an image that fails to read later (truncated here after the scan) does not shift one process's
    indices against the others', and no process decodes the whole dataset before its first image."""
    from pipeline.config.loading import load_config
    from pipeline.context import RunContext
    from pipeline.stages.describe import datasets

    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        for i in range(3):
            _jpeg(root / "test" / cls / f"{i}.png")
    broken = root / "test" / "dog" / "1.png"  # index 4: cat 0-2, then dog 0-2
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    pets = f"{{kind: imagefolder, name: pets, split: test, root: {root}, corrupt: skip}}"
    cfg = load_config(None, [f"data.zero_shot=[{pets}]", f"cache_dir={tmp_path / 'cache'}"])
    lines = []
    described = datasets(RunContext(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", log=lines.append), training=False)
    (spec,), (info,) = described.specs.values(), described.infos.values()
    assert spec.skipped == (4,) and info.size == 5
    (line,) = [line for line in lines if "leaves out" in line]  # said once, by the stage
    assert line.startswith(f"[data] data.zero_shot.0: corrupt: skip leaves out the corrupt image {broken} (")
    late = root / "test" / "cat" / "2.png"
    late.write_bytes(b"truncated after the scan")
    data = load_dataset(spec, 16)
    assert len(data) == 5
    # reading it is one line that says it failed after the check, not the advice to set corrupt: skip
    with pytest.raises(InputError, match=f"corrupt image {late} .*decoded when this run checked the dataset"):
        data.images[2]
    # likewise where the check found nothing to leave out
    with pytest.raises(InputError, match=f"corrupt image {late} .*decoded when this run checked the dataset"):
        load_dataset(replace(spec, skipped=()), 16).images[2]


def test_limit_draws_a_seeded_subset_of_every_class(tmp_path):
    """ImageNet val with `limit: 1000` must not be its first 20 classes: on 10 classes of 8 images (sorted by
    class on disk), limit 20 takes 2 of each; the same seed the same subset, another seed another."""
    for c in range(10):
        for i in range(8):
            _jpeg(tmp_path / "val" / f"class{c}" / f"{i}.png")
    spec = DatasetSpec("imagefolder", "toys", "val", str(tmp_path), limit=20)
    data = load_dataset(spec, 16)
    labels = [int(data.images[i][1]) for i in range(len(data))]
    assert len(labels) == 20 and np.bincount(labels).tolist() == [2] * 10
    assert data.images.indices == load_dataset(spec, 16).images.indices
    other = load_dataset(DatasetSpec("imagefolder", "toys", "val", str(tmp_path), limit=20, subset_seed=1), 16)
    assert other.images.indices != data.images.indices and other.info().identity != data.info().identity
    assert data.info().identity["limit"] == 20 and data.info().identity["stratified"]


def test_subset_shares_follow_the_class_sizes_and_a_tiny_limit_draws_its_classes():
    labels = [0] * 5 + [1] * 3 + [2] * 2  # shares of 5: 2.5, 1.5, 1.0 -> 2 + 1 + 1, one more for class 0 or 1
    for seed in range(6):
        taken = np.bincount([labels[i] for i in subset_indices(10, 5, seed, labels)], minlength=3).tolist()
        assert taken in ([3, 1, 1], [2, 2, 1])
    drawn = {tuple(subset_indices(100, 3, seed, [i // 10 for i in range(100)])) for seed in range(5)}
    assert all(len({i // 10 for i in d}) == 3 for d in drawn) and len(drawn) > 1  # 3 classes of 10, not the first 3
    plain = subset_indices(100, 7, 0, None)
    assert len(set(plain)) == 7 and plain == sorted(plain) and plain != list(range(7))


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_missing_root_names_the_dataset_and_the_layout(tmp_path, kind):
    problem = check_root(DatasetSpec(kind, f"my-{kind}", LOADERS[kind].splits[-1], str(tmp_path)))
    assert problem.startswith(f"my-{kind}: ") and LOADERS[kind].layout in problem


def test_food101_reads_its_split_json(tmp_path):
    base = tmp_path / "food-101"
    for cls in ("apple_pie", "ramen"):
        for i in range(2):
            _jpeg(base / "images" / cls / f"{i}.jpg")
    (base / "meta").mkdir()
    (base / "meta" / "test.json").write_text(
        json.dumps({"apple_pie": ["apple_pie/1"], "ramen": ["ramen/0", "ramen/1"]})
    )
    data = load_dataset(DatasetSpec("food101", "food101", "test", str(tmp_path)), 16)
    _check(data, 3, ["apple pie", "ramen"], "A photo of {}, a type of food.")
    assert [int(data.images[i][1]) for i in range(3)] == [0, 1, 1]


def test_oxford_pets_reads_its_annotation_list(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    for image_id in ("Abyssinian_1", "great_pyrenees_7", "Abyssinian_2"):
        _jpeg(base / "images" / f"{image_id}.jpg")
    (base / "annotations").mkdir()
    (base / "annotations" / "test.txt").write_text("Abyssinian_1 1 1 1\ngreat_pyrenees_7 2 2 1\nAbyssinian_2 1 1 1\n")
    data = load_dataset(DatasetSpec("pets", "pets", "test", str(tmp_path)), 16)
    _check(data, 3, ["Abyssinian", "Great Pyrenees"], "A photo of a {}, a type of pet.")
    assert [int(data.images[i][1]) for i in range(3)] == [0, 1, 0]


def test_fgvc_aircraft_reads_its_variant_lists(tmp_path):
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    for image_id in ("0001", "0002"):
        _jpeg(base / "images" / f"{image_id}.jpg")
    (base / "variants.txt").write_text("707-320\nA380\n")
    (base / "images_variant_test.txt").write_text("0001 A380\n0002 707-320\n")
    data = load_dataset(DatasetSpec("aircraft", "aircraft", "test", str(tmp_path)), 16)
    _check(data, 2, ["707-320", "A380"], "A photo of a {}, a type of aircraft.")
    assert [int(data.images[i][1]) for i in range(2)] == [1, 0]


EUROSAT_FOLDERS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]


def test_eurosat_folders_get_clips_readable_class_names(tmp_path):
    for cls in reversed(EUROSAT_FOLDERS):
        _jpeg(tmp_path / "eurosat" / "2750" / cls / f"{cls}_1.jpg")
    data = load_dataset(DatasetSpec("eurosat", "eurosat", "all", str(tmp_path)), 16)
    _check(data, 10, clip_classnames("eurosat"), "A centered satellite photo of {}.")
    by_folder = {str(path).split("/")[-2]: data.classnames[label] for path, label in data.images.images.samples}
    assert by_folder["AnnualCrop"] == "annual crop land" and by_folder["SeaLake"] == "lake or sea"
    assert by_folder["HerbaceousVegetation"] == "brushland or shrubland"


def test_curated_names_without_clip_benchmark_are_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    """clip-benchmark is installed without its dependencies (pyproject's [tool.agft]), so a plain `pip install`
    of agft lacks it: the dataset that needs its names says how to install it."""
    for cls in EUROSAT_FOLDERS:
        _jpeg(tmp_path / "eurosat" / "2750" / cls / f"{cls}_1.jpg")
    for module in ("clip_benchmark", "clip_benchmark.datasets"):  # as if not installed, imported before or not
        monkeypatch.setitem(sys.modules, module, None)
    _clip_benchmark_classnames.cache_clear()
    try:
        missing = r"^the class names .*\(clip-benchmark's 'eurosat'\).* pip install --no-deps clip-benchmark$"
        with pytest.raises(InputError, match=missing):
            load_dataset(DatasetSpec("eurosat", "eurosat", "all", str(tmp_path)), 16)
    finally:
        _clip_benchmark_classnames.cache_clear()


def test_eurosat_with_missing_class_folders_is_refused(tmp_path):
    for cls in ("AnnualCrop", "SeaLake"):  # by position, SeaLake would be called "forest"
        _jpeg(tmp_path / "eurosat" / "2750" / cls / f"{cls}_1.jpg")
    with pytest.raises(InputError, match="found 2 class folders.*eurosat.*10 of the whole dataset"):
        load_dataset(DatasetSpec("eurosat", "eurosat", "all", str(tmp_path)), 16)


def test_caltech101_takes_clips_names_by_folder_and_converts_greyscale(tmp_path):
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    # The real dataset's first folders in sorted order, then stand-ins for the other 96 categories
    for folder in (
        "BACKGROUND_Google",
        "Faces",
        "Faces_easy",
        "Leopards",
        "Motorbikes",
        "accordion",
        "airplanes",
        *(f"zz_{i:02d}" for i in range(95)),
    ):
        _jpeg(base / folder / "image_0001.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(base / "Faces_easy" / "image_0001.jpg")  # greyscale
    data = load_dataset(DatasetSpec("caltech101", "caltech101", "all", str(tmp_path)), 16)
    assert len(data.classnames) == 101 and len(data) == 101  # the background is not a class
    name_of = {
        folder: data.classnames[label]
        for label, folder in (
            (int(data.images[i][1]), data.images.images.categories[int(data.images[i][1])]) for i in range(7)
        )
    }
    # clip-benchmark's list starts with "background": matched by position, Faces would be "background"
    assert name_of == {
        "Faces": "off-center face",
        "Faces_easy": "centered face",
        "Leopards": "leopard",
        "Motorbikes": "motorbike",
        "accordion": "accordion",
        "airplanes": "airplane",
        "zz_00": "anchor",
    }
    assert all(data.images[i][0].shape == (3, 16, 16) for i in range(3))


def test_caltech256_numbered_folders_become_plain_names(tmp_path):
    base = tmp_path / "caltech256" / "256_ObjectCategories"
    _jpeg(base / "001.ak47" / "001_0001.jpg")
    _jpeg(base / "002.american-flag" / "002_0001.jpg")
    _jpeg(base / "002.american-flag" / "002_0002.jpg")
    data = load_dataset(DatasetSpec("caltech256", "caltech256", "all", str(tmp_path)), 16)
    _check(data, 3, ["ak47", "american flag"], "A photo of a {}.")


def test_sun397_reads_its_class_list(tmp_path):
    base = tmp_path / "SUN397"
    base.mkdir()
    (base / "ClassName.txt").write_text("/a/abbey\n/a/apartment_building/outdoor\n")
    _jpeg(base / "a" / "abbey" / "sun_aaa.jpg")
    _jpeg(base / "a" / "apartment_building" / "outdoor" / "sun_bbb.jpg")
    data = load_dataset(DatasetSpec("sun397", "sun397", "all", str(tmp_path)), 16)
    _check(data, 2, ["abbey", "apartment building outdoor"], "This is a photo of a {}.")


def test_sun397_indexes_its_images_in_one_order_whatever_the_file_systems(tmp_path, monkeypatch):
    """torchvision lists SUN397 in the file system's order: two copies of it (two nodes' own) must still give each
    index the same image, or a cell's shards, scored on different nodes, count some images twice."""
    base = tmp_path / "SUN397"
    base.mkdir()
    (base / "ClassName.txt").write_text("/a/abbey\n/b/beach\n")
    for name in ("sun_a1", "sun_a2", "sun_a3"):
        _jpeg(base / "a" / "abbey" / f"{name}.jpg")
    for name in ("sun_b1", "sun_b2"):
        _jpeg(base / "b" / "beach" / f"{name}.jpg")
    spec = DatasetSpec("sun397", "sun397", "all", str(tmp_path))

    def labels():
        data = load_dataset(spec, 16)
        return [data.images[i][1] for i in range(len(data.images))], data.identity

    listed = labels()
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(sorted(rglob(self, pattern))))
    assert labels() == listed and listed[0] == [0, 0, 0, 1, 1]


def test_flowers102_reads_its_mat_label_and_split_files(tmp_path, no_md5):
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    for image_id in (1, 2, 3):
        _jpeg(base / "jpg" / f"image_{image_id:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([[3, 1, 2]])})  # 1-based labels of images 1..3
    savemat(base / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[3, 1]])})
    data = load_dataset(DatasetSpec("flowers102", "flowers102", "test", str(tmp_path)), 16)
    _check(data, 2, clip_classnames("flowers"), "A photo of a {}, a type of flower.")
    assert data.classnames[:2] == ["pink primrose", "hard-leaved pocket orchid"]
    assert "pink and yellow dahlia" in data.classnames and "pink-yellow dahlia?" in tvd.Flowers102.classes
    assert [int(data.images[i][1]) for i in range(2)] == [1, 2]  # image 3 is class 2, image 1 class 3 (0-based)


def test_stanford_cars_reads_its_devkit_mat_files(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    for name in ("00001.jpg", "00002.jpg"):
        _jpeg(base / "cars_test" / name)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    (base / "devkit").mkdir()
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None, :]})
    annotations = np.array([("00001.jpg", 2), ("00002.jpg", 1)], dtype=[("fname", object), ("class", object)])
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations[None, :]})
    data = load_dataset(DatasetSpec("cars", "cars", "test", str(tmp_path)), 16)
    _check(data, 2, list(names), "A photo of a {}.")
    assert [int(data.images[i][1]) for i in range(2)] == [1, 0]


def test_pcam_reads_its_h5_patches(tmp_path):
    import h5py

    base = tmp_path / "pcam"
    base.mkdir()
    with h5py.File(base / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f["x"] = _pixels(3, 96)
    with h5py.File(base / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f["y"] = np.array([0, 1, 1], np.uint8).reshape(3, 1, 1, 1)
    data = load_dataset(DatasetSpec("pcam", "pcam", "test", str(tmp_path)), 16)
    _check(data, 3, ["lymph node", "lymph node containing metastatic tumor tissue"], "This is a photo of {}.")
    assert [int(data.images[i][1]) for i in range(3)] == [0, 1, 1]


def test_small_images_are_attacked_at_their_own_resolution_and_upsampled_inside_the_model(tmp_path, no_md5):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    from agft_core.attacks import pgd
    from agft_core.model import ImageEncoder

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "test_batch").write_bytes(
        pickle.dumps({"data": _pixels(4, 32).transpose(0, 3, 1, 2).reshape(4, -1), "labels": [0, 1, 0, 1]})
    )
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": ["cat", "dog"]}))
    data = load_dataset(DatasetSpec("cifar10", "cifar10", "test", str(tmp_path)), 224)
    x = torch.stack([data.images[i][0] for i in range(4)])
    assert x.shape == (4, 3, 32, 32)  # not resized to the model's 224 first
    torch.manual_seed(0)
    visual = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(16))
    encoder = ImageEncoder(visual, [0.5] * 3, [0.25] * 3, size=64)
    upsampled = resize(x, [64, 64], InterpolationMode.BICUBIC, antialias=False).clamp(0, 1)
    expected = torch.nn.functional.normalize(visual((upsampled - 0.5) / 0.25), dim=-1)
    assert torch.allclose(encoder(x), expected, atol=1e-6)
    eps = 2 / 255
    x_adv = pgd(lambda z: encoder(z).sum(), x, eps, eps / 2, 3, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= eps + 1e-6  # the ε-ball is in 32-px space


# The official AGFT code's prompt per dataset (clip_dataset.py; TeCoA's and TGA-ZSR's are the same but for
# a missing full stop): the paper's 15 zero-shot datasets.
PAPER_PROMPTS = {
    "caltech101": "A photo of a {}.",
    "caltech256": "A photo of a {}.",
    "cifar10": "This is a photo of a {}.",
    "cifar100": "This is a photo of a {}.",
    "dtd": "A surface with a {} texture.",
    "eurosat": "A centered satellite photo of {}.",
    "aircraft": "A photo of a {}, a type of aircraft.",
    "flowers102": "A photo of a {}, a type of flower.",
    "food101": "A photo of {}, a type of food.",
    "imagenet": "This is a photo of a {}.",
    "pets": "A photo of a {}, a type of pet.",
    "pcam": "This is a photo of {}.",
    "cars": "A photo of a {}.",
    "stl10": "This is a photo of a {}.",
    "sun397": "This is a photo of a {}.",
}


def test_the_paper_config_evaluates_its_15_datasets_with_the_official_prompts():
    from pipeline.config.loading import load_config

    cfg = load_config("vitb32_imagenet")
    assert sorted(d.kind for d in cfg.data.zero_shot) == sorted(PAPER_PROMPTS)
    assert {kind: LOADERS[kind].template for kind in PAPER_PROMPTS} == PAPER_PROMPTS
    assert {kind for kind, loader in LOADERS.items() if loader.native} == {"cifar10", "cifar100", "stl10"}
