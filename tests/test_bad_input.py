"""The catalogue of bad input: each is one line naming the field or file, exit status 2, no traceback,
and the MLflow store and the caches byte-identical before and after. Real files in each format."""

import hashlib
import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from tiny import sets

from agft_core.cache import CacheEntry, embedding_table, join, write_parquet
from agft_core.catalog import EMBEDDED_ARCH, EMBEDDED_ARCH_DIR
from agft_core.model import save_weights
from pipeline.cli import main

SMALL = ["data.zero_shot=[{name: colours, limit: 16}]", "train.validation=null", "train.epochs=1"]
RANDOM = ["--set", f"model.arch={EMBEDDED_ARCH}", "--set", "model.weights=random"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _image_folder(root: Path, split: str = "train", per_class: int = 4) -> Path:
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            _png(root / split / name / f"{i}.png", 10 * c + i)
    return root


class _RunsCode:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with content (a cache and an MLflow run) and a directory of bad files."""
    root = tmp_path_factory.mktemp("bad")
    store, files = root / "store", root / "files"
    entry = CacheEntry(store / "cache", "teacher", {"weights": "w", "dataset": "d", "preprocess": "p"})
    attempt = entry.begin()
    entry.commit(
        attempt,
        [
            write_parquet(
                embedding_table({"index": np.arange(4)}, np.ones((4, 8), np.float32)),
                join(attempt, "part-00000.parquet"),
            )
        ],
    )
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("agft"))
    client.log_metric(run.info.run_id, "loss", 1.0)

    _image_folder(files / "good")
    (files / "empty" / "train" / "cat").mkdir(parents=True)
    _image_folder(files / "corrupt")
    (files / "corrupt" / "train" / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    buffers = []
    for i in range(4):
        out = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(out, format="PNG")
        buffers.append(out.getvalue())
    table = pa.table({"image": buffers, "label": [0, 1, 0, 1]}).replace_schema_metadata(
        {"classnames": json.dumps(["cat", "dog"])}
    )
    (files / "parquet").mkdir()
    pq.write_table(table, files / "parquet" / "train.parquet")
    data = (files / "parquet" / "train.parquet").read_bytes()
    (files / "parquet" / "train.parquet").write_bytes(data[: len(data) // 2])
    (files / "garbage.safetensors").write_bytes(os.urandom(4096))
    # Another architecture: the tiny CLIP with a wider image tower, registered with open_clip here only.
    tiny = json.loads((EMBEDDED_ARCH_DIR / f"{EMBEDDED_ARCH}.json").read_text())
    tiny["vision_cfg"]["width"] *= 2
    (files / "archs").mkdir()
    (files / "archs" / "agft-tiny-vit-wide.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(files / "archs")
    save_weights(open_clip.create_model("agft-tiny-vit-wide"), files / "wide.safetensors", "agft-tiny-vit-wide")
    torch.save(_RunsCode(files / "pwned"), files / "evil.pt")
    return store, uri, files


def _snapshot(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


def _config_file(files: Path, name: str, text: str) -> Path:
    path = files / name
    path.write_text(text)
    return path


def _random_with(*overrides: str) -> list[str]:
    """RANDOM and --set FIELD=VALUE for each override."""
    return RANDOM + sets(overrides)


# (id, argv after the command, text the error line must contain). {files} and {port} are filled in.
CASES = [
    ("yaml-syntax", ["--config", "{files}/syntax.yaml"], "invalid YAML"),
    ("top-level-list", ["--config", "{files}/list.yaml"], "expected a mapping"),
    ("duplicate-key", ["--config", "{files}/duplicate.yaml"], "duplicate key 'epochs'"),
    ("missing-config", ["--config", "{files}/nowhere.yaml"], "nowhere.yaml"),
    ("unknown-key", ["--set", "trian.epochs=2"], "trian"),
    ("unknown-nested-key", ["--set", "train.attack.epss=1"], "train.attack.epss"),
    ("set-without-value", ["--set", "train.epochs"], "--set 'train.epochs'"),
    ("fraction-not-a-number", ["--set", "train.attack.eps=1/x"], "train.attack.eps"),
    ("fraction-by-zero", ["--set", "train.attack.eps=1/0"], "train.attack.eps"),
    ("out-of-range", ["--set", "train.epochs=0"], "train.epochs"),
    ("eps-above-one", ["--set", "eval.attack.eps=2"], "eval.attack.eps"),
    ("wrong-type", ["--set", "train.batch_size=many"], "train.batch_size"),
    ("unknown-method", ["--set", "train.method=magic"], "train.method"),
    ("unknown-arch", ["--set", "model.arch=ViT-Q-99"], "model.arch"),
    ("unknown-dataset-kind", ["--set", "data.train={kind: mnistx, name: m, split: train, root: /x}"], "mnistx"),
    ("unknown-embedded-dataset", ["--set", "data.train={name: unicorns, split: train}"], "unicorns"),
    ("unknown-pretrained-tag", ["--set", "model.arch=ViT-B-32", "--set", "model.weights=laion9b"], "laion9b"),
    ("missing-pretrained-weights", ["--set", "model.arch=ViT-B-32", "--set", "model.weights=openai"], "model.weights"),
    ("gpus-fraction-above-one", ["--set", "resources.task_gpus=1.5"], "resources.task_gpus"),
    ("unsupported-cache-scheme", ["--set", "cache_dir=ftp://host/cache"], "cache_dir"),
    ("same-zero-shot-name-twice", ["--set", "data.zero_shot=[{name: colours}, {name: colours}]"], "colours"),
    ("uniform-axis-on-integer", ["--set", "sweep.space={train.epochs: {uniform: [1, 3]}}"], "sweep.space.train.epochs"),
    ("grace-period-above-epochs", ["--set", "sweep.grace_period=5", "--set", "train.epochs=2"], "sweep.grace_period"),
    ("gpus-more-than-one-per-task", ["--set", "resources.task_gpus=2"], "resources.task_gpus"),
    ("unreachable-tracking-server", ["--tracking-uri", "http://127.0.0.1:{port}"], "--tracking-uri"),
    ("unreachable-ray-address", ["--address", "127.0.0.1:{port}"], "--address"),
    # found by the Ray tasks that read the data and the weights, before anything is written
    (
        "missing-train-root",
        _random_with("data.train={kind: imagefolder, name: f, split: train, root: {files}/nowhere}"),
        "data.train",
    ),
    (
        "missing-zero-shot-root",
        _random_with("data.zero_shot=[{kind: cifar10, name: c, split: test, root: {files}/nowhere}]"),
        "data.zero_shot.0",
    ),
    (
        "missing-validation-root",
        _random_with("train.validation={dataset: {kind: imagefolder, name: v, split: val, root: {files}/good}}"),
        "train.validation",
    ),
    (
        "empty-image-folder",
        _random_with("data.train={kind: imagefolder, name: e, split: train, root: {files}/empty}"),
        "data.train: e: cannot read imagefolder train under {files}/empty",
    ),
    (
        "corrupt-image",
        _random_with(
            "data.train={kind: imagefolder, name: k, split: train, root: {files}/corrupt}", "train.batch_size=2"
        ),
        "data.train: k: corrupt image {files}/corrupt/train/dog/2.png",
    ),
    # a zero-shot or validation set is decoded only after training: checked before anything is written
    (
        "corrupt-zero-shot-image",
        _random_with("data.zero_shot=[{kind: imagefolder, name: k, split: train, root: {files}/corrupt}]"),
        "data.zero_shot.0: k: corrupt image {files}/corrupt/train/dog/2.png",
    ),
    (
        "corrupt-validation-image",
        _random_with("train.validation={dataset: {kind: imagefolder, name: k, split: train, root: {files}/corrupt}}"),
        "train.validation.dataset: k: corrupt image {files}/corrupt/train/dog/2.png",
    ),
    (
        "truncated-parquet-dataset",
        _random_with("data.train={kind: parquet, name: p, split: train, root: {files}/parquet}"),
        "data.train: p: cannot read parquet train under {files}/parquet",
    ),
    (
        "missing-weights-file",
        ["--set", "model.arch=RN50", "--set", "model.weights={files}/nowhere/rn50.pt"],
        "model.weights: weights file {files}/nowhere/rn50.pt does not exist",
    ),
    (
        "garbage-weights",
        ["--set", f"model.arch={EMBEDDED_ARCH}", "--set", "model.weights={files}/garbage.safetensors"],
        "model.weights: {files}/garbage.safetensors is not",
    ),
    (
        "weights-of-another-architecture",
        ["--set", f"model.arch={EMBEDDED_ARCH}", "--set", "model.weights={files}/wide.safetensors"],
        "saved from architecture agft-tiny-vit-wide",
    ),
    (
        "pickle-that-runs-code",
        ["--set", f"model.arch={EMBEDDED_ARCH}", "--set", "model.weights={files}/evil.pt"],
        "model.weights: {files}/evil.pt: refused",
    ),
    (
        "more-teacher-shards-than-images",
        RANDOM
        + [
            "--set",
            "data.train={kind: imagefolder, name: g, split: train, root: {files}/good}",
            "--set",
            "train.batch_size=2",
            "--set",
            "teacher_cache_shards=100",
        ],
        "teacher_cache_shards",
    ),
    (
        "batch-above-a-workers-share",
        RANDOM
        + [
            "--set",
            "data.train={kind: imagefolder, name: g, split: train, root: {files}/good}",
            "--set",
            "train.batch_size=64",
        ],
        "train.batch_size",
    ),
]
SWEEP_ONLY = {"uniform-axis-on-integer", "grace-period-above-epochs"}


@pytest.mark.parametrize("case, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ray_local, world, capfd, case, argv, needle):
    store, uri, files = world
    _config_file(files, "syntax.yaml", "train: {epochs: 2\n")
    _config_file(files, "list.yaml", "- train\n- eval\n")
    _config_file(files, "duplicate.yaml", "train:\n  epochs: 2\n  epochs: 3\n")
    port = _free_port()
    fill = lambda text: text.replace("{files}", str(files)).replace("{port}", str(port))  # noqa: E731
    argv = [fill(a) for a in argv]
    command = "sweep" if case in SWEEP_ONLY else "run"
    tracking = [] if "--tracking-uri" in argv else ["--tracking-uri", uri]
    before = _snapshot(store)
    capfd.readouterr()
    code = main([command, *tracking, "--set", f"cache_dir={store / 'cache'}", *sets(SMALL), *argv])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("agft:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and fill(needle) in lines[0], err[-3000:]
    # nothing else of ours: what may precede it is Ray's own notice that it started with token auth
    assert [line for line in err.splitlines() if line.strip() and "authentication_token_setup" not in line] == lines, (
        err
    )
    assert "Traceback" not in err
    assert _snapshot(store) == before
    assert not (files / "pwned").exists()


def test_the_catalogue_covers_at_least_thirty_kinds():
    assert len({case for case, _, _ in CASES}) >= 30
