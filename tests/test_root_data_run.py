"""One `agft run` on datasets read from roots (generated ImageFolders), as a user's first real-data run:
how often their files are stat'ed, and which images a `limit` takes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from file_audit import STAT_CALLS, stats_under, traced
from mlflow.tracking import MlflowClient
from PIL import Image
from tiny import sets

CLASSES = 10


def _imagefolder(root: Path) -> None:
    """train, val and test splits of CLASSES classes, sorted by class on disk as ImageFolder reads them."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 3), ("test", 4)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
def test_one_run_stats_each_image_once_and_records_the_subset_its_limit_took(tmp_path):
    data, log = tmp_path / "toys", tmp_path / "stats.log"
    _imagefolder(data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        "model.weights=random",
        f"cache_dir={tmp_path / 'cache'}",
        "pretrain.epochs=1",
        f"data.train={{kind: imagefolder, name: toys, split: train, root: {data}}}",
        f"data.zero_shot=[{{kind: imagefolder, name: toys-test, split: test, root: {data}, limit: 20}}]",
        f"train.validation={{dataset: {{kind: imagefolder, name: toys-val, split: val, root: {data}}}}}",
        "train.epochs=1",
        "train.batch_size=8",
        "train.num_workers=2",
        "train.warmup_epochs=0",
        "eval.attack.steps=1",
        "eval.quick=null",
        "eval.batch_size=16",
        "register_models=false",
    ]
    command = [
        str(Path(sys.executable).parent / "agft"),
        "run",
        "--tracking-uri",
        uri,
        "--summary",
        str(tmp_path / "summary.json"),
    ] + sets(overrides)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    images = sorted(str(p) for p in data.rglob("*.png"))
    done = subprocess.run(
        traced(command, log, STAT_CALLS, images), env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # one listing per dataset per run: the describe step's, reused by every task that reads the images
    counts = stats_under(log, data)
    assert {path: n for path, n in counts.items() if n > 1 and path in images} == {}
    assert set(images) <= set(counts)  # the listing did stat them: the trace sees these calls

    # limit 20 of the 40 test images: 2 of each class, recorded in the MLflow run's dataset input
    client = MlflowClient(uri)
    run = client.get_run(json.loads((tmp_path / "summary.json").read_text())["run_id"])
    (test_input,) = [d for d in run.inputs.dataset_inputs if d.dataset.name == "toys-test"]
    assert json.loads(test_input.dataset.source) | {"uri": None} == {
        "uri": None,
        "split": "test",
        "limit": 20,
        "subset_seed": 0,
        "stratified": True,
    }
