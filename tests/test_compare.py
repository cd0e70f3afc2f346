"""A tiny `agft compare`: nested runs per (method, seed), the table, and its statistics."""

import re
import statistics

import pytest
from mlflow.tracking import MlflowClient
from tiny import TEACHER, sets

from pipeline.cli import main

TINY = [
    *TEACHER,
    "data.train.limit=128",
    "data.zero_shot=[{name: shapes, limit: 48}, {name: colours, limit: 48}, {name: sizes, limit: 48}]",
    "train.epochs=1",
    "train.batch_size=32",
    "train.num_workers=1",
    "train.validation=null",
    "eval.attack.steps=2",
    "eval.quick=null",
    "compare.methods=[tecoa, agft]",
    "compare.seeds=[0, 1]",
    "compare.per_method={tecoa: {train.lr: 1.0e-3}}",
]


@pytest.mark.slow
def test_compare_writes_nested_runs_and_a_mean_std_table(ray_local, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "compare.md"
    argv = ["compare", "--tracking-uri", uri, "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(argv + sets(TINY)) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("agft").experiment_id
    (parent,) = client.search_runs([experiment], "tags.kind = 'compare'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["agft-seed0", "agft-seed1", "tecoa-seed0", "tecoa-seed1"]
    assert all(c.info.status == "FINISHED" for c in children)
    datasets = lambda run: {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}  # noqa: E731
    assert datasets(parent) and all(datasets(c) == datasets(parent) for c in children)
    assert {c.info.run_name: c.data.params["train.lr"] for c in children} == {  # compare.per_method: TeCoA's only
        "agft-seed0": "0.0005",
        "agft-seed1": "0.0005",
        "tecoa-seed0": "0.001",
        "tecoa-seed1": "0.001",
    }
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "compare.md",
        "compare.png",
        "compare_per_seed.csv",
    }
    # the parent's numbers are the mean over the children's
    for method in ("tecoa", "agft"):
        runs = [c for c in children if c.info.run_name.startswith(method)]
        expected = statistics.fmean(c.data.metrics["finetuned_robust/mean"] for c in runs)
        assert abs(parent.data.metrics[f"{method}_robust/mean"] - expected) < 1e-12
        # the zero-shot mean leaves out the fine-tuned task (shapes)
        held_out = statistics.fmean(c.data.metrics[f"finetuned_robust/{d}"] for c in runs for d in ("colours", "sizes"))
        assert abs(parent.data.metrics[f"{method}_robust/zero-shot_mean"] - held_out) < 1e-12
    table = re.sub(" +", " ", out.read_text())
    assert "mean ± sample std over 2 seed(s)" in table and "| original clean | original robust |" in table
    # the teacher, which no seed changes, is evaluated once (by the first run) and shown without a std
    assert [c.info.run_name for c in children if "original_clean/mean" in c.data.metrics] == ["tecoa-seed0"]
    original_mean = 100 * parent.data.metrics["original_clean/mean"]
    assert re.search(rf"^\| mean \| {original_mean:.2f} \| [\d.]+ \| [\d.]+ ± ", table, re.M), table
    # what the robust columns are, and how the methods were trained
    assert (
        "robust: APGD-CE-2 × 2 restarts, ε = 2/255; an image counts as robust when its attacked version is classified "
        "correctly (the paper's count)" in table
    )
    assert (
        "training: every method at the same recipe (sgd, lr 0.0005, weight decay 0, PGD-2 at ε = 2/255); "
        "tecoa: train.lr = 0.001" in table
    )
    sizes_row = next(line for line in table.splitlines() if line.startswith("| sizes |"))
    agft_seed_values = [
        100 * c.data.metrics["finetuned_clean/sizes"] for c in children if c.info.run_name.startswith("agft")
    ]
    assert f"{statistics.fmean(agft_seed_values):.2f} ± {statistics.stdev(agft_seed_values):.2f}" in sizes_row
    assert "[compare] run 4/4: agft, seed 1" in capsys.readouterr().out
