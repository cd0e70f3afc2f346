"""A tiny but complete `agft run`: real local Ray, real Ray Train (2 gloo workers), real MLflow store."""
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.dag import Pipeline

TINY = [
    "pretrain.corpus_size=512", "pretrain.epochs=1", "pretrain.batch_size=128",
    "data.train.limit=256",
    "data.zero_shot=[{name: colours, limit: 64}, {name: shapes, limit: 64}]",
    "train.epochs=2", "train.batch_size=32", "train.num_workers=2",
    "eval.attack.steps=2", "eval.quick.steps=2", "eval.batch_size=64",
]


def _sets(overrides: list[str]) -> list[str]:
    """--set FIELD=VALUE for each override, as the CLI takes them."""
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return root, f"sqlite:///{root / 'mlflow.db'}"


def _run(store, *extra, rerun=()):
    root, uri = store
    cfg = load_config(None, TINY + [f"cache_dir={root / 'cache'}", *extra])
    lines = []
    return Pipeline(cfg, uri, set(rerun), log=lines.append).run(), lines


@dataclass
class CliResult:
    run_id: str
    rows: list
    cache_hits: dict


@pytest.fixture(scope="module")
def first(ray_local, store):
    """The first run goes through the CLI, from the store's directory, with the default tracking URI."""
    root, uri = store
    summary = root / "summary.json"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["run", "--set", f"cache_dir={root / 'cache'}", "--summary", str(summary)]
                    + _sets(TINY))
    finally:
        os.chdir(cwd)
    assert code == 0 and (root / "mlflow.db").is_file()
    data = json.loads(summary.read_text())
    return CliResult(data["run_id"], data["rows"], data["cache_hits"]), []


def test_run_logs_metrics_artifacts_and_epochs(first, store, tmp_path):
    result, _ = first
    client = MlflowClient(store[1])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for dataset in ("colours", "shapes", "mean"):
        for column in ("original_clean", "original_robust", "finetuned_clean", "finetuned_robust"):
            assert 0.0 <= metrics[f"{column}/{dataset}"] <= 1.0
    assert run.data.params["calibration.gamma"] == "1.0"  # configs/demo.yaml
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert artifacts == {"config.yaml", "zero_shot_accuracy.csv", "zero_shot_accuracy.png",
                         "image_encoder.safetensors", "timeline.json", "timeline.png"}
    timeline = json.loads(Path(client.download_artifacts(result.run_id, "timeline.json", str(tmp_path))).read_text())
    steps = [bar["step"] for bar in timeline if bar["node"] == "driver"]
    assert steps == ["pretrain", "teacher", "text", "train", "eval"]  # in order; eval tasks carry their node
    assert all(0 <= bar["start"] <= bar["end"] for bar in timeline)
    assert not any(bar["cached"] for bar in timeline)  # the first run computes everything
    history = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history)
    assert {m.key for m in client.get_metric_history(result.run_id, "lr")} == {"lr"}


def test_first_run_builds_every_step(first):
    result, _ = first
    assert not any(result.cache_hits.values()), result.cache_hits


def test_second_run_skips_cached_steps(first, store):
    result, lines = _run(store)
    assert result.cache_hits and all(result.cache_hits.values()), result.cache_hits
    assert any("[teacher shapes] cached, skipping" in line for line in lines)
    assert "[eval original, finetuned] 8 of 8 results cached, skipping" in lines  # 2 datasets x 2 encoders x 2 attacks
    assert result.run_id != first[0].run_id
    assert result.rows == first[0].rows


def test_rerun_eval_computes_the_same_numbers_again(first, store):
    result, lines = _run(store, rerun=("eval",))
    assert result.cache_hits["eval original, finetuned"] is False and result.cache_hits["train"] is True
    assert "[eval original, finetuned] 0 of 8 results cached, computing 8" in lines
    assert result.rows == first[0].rows  # seeded attacks on identical caches: identical numbers


def test_changed_prompt_rebuilds_only_its_text_cache(first, store):
    result, _ = _run(store, "data.zero_shot=[{name: colours, limit: 64, templates: ['a picture of a {} shape.']},"
                            " {name: shapes, limit: 64}]")
    hits = result.cache_hits
    assert hits["text colours"] is False
    assert hits["text shapes (train)"] and hits["text colours (val)"] and hits["teacher shapes"] and hits["pretrain"] and hits["train"]


def test_truncated_teacher_shard_is_rebuilt(first, store):
    root = store[0] / "cache" / "teacher"
    (entry,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    shard = sorted(entry.glob("attempt-*/part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    result, lines = _run(store)
    assert result.cache_hits["teacher shapes"] is False
    assert any(f"corrupt file {shard.parent.name}/part-00000.parquet" in line for line in lines)
    assert result.rows == first[0].rows


def test_cache_checkpoints_and_artifacts_on_file_uris(first, store, tmp_path):
    """Shared storage is named by URI: here a second local path, through pyarrow's file:// filesystem."""
    shared = tmp_path / "shared"
    uris = [f"cache_dir={(shared / 'cache').as_uri()}", f"storage_path={(shared / 'checkpoints').as_uri()}",
            f"artifact_location={(shared / 'artifacts').as_uri()}", "experiment=shared-storage"]
    result, _ = _run(store, *uris)
    assert not any(result.cache_hits.values()), result.cache_hits
    assert result.rows == first[0].rows  # same seeds, same numbers, wherever the caches live
    for kind in ("pretrain", "text", "teacher", "finetune"):
        assert list((shared / "cache" / kind).glob("*/manifest.json")), kind
    assert list((shared / "checkpoints").glob("finetune-*/checkpoint_*/image_encoder.safetensors"))
    run = MlflowClient(store[1]).get_run(result.run_id)
    assert run.info.artifact_uri.startswith((shared / "artifacts").as_uri())
    assert list((shared / "artifacts").rglob("zero_shot_accuracy.csv"))
    again, _ = _run(store, *uris)
    assert all(again.cache_hits.values()), again.cache_hits


def test_batch_larger_than_a_workers_share_is_one_clear_error(first, store, capsys):
    root, uri = store
    code = main(["run", "--tracking-uri", uri, "--set", f"cache_dir={root / 'cache'}"]
                + _sets(TINY + ["train.batch_size=200"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("agft: error: train.batch_size: 200 is more than the 128 images")


@pytest.mark.parametrize("method", ["tga_zsr", "fare"])
def test_baselines_that_need_the_frozen_encoder_train_under_ddp(first, store, method):
    """Attention maps (a tuple output) and unnormalised features (a keyword) through DDP's forward."""
    result, _ = _run(store, f"train.method={method}", "train.epochs=1")
    assert result.cache_hits["pretrain"] and result.cache_hits["teacher shapes"]
    assert result.cache_hits["train"] is False
    run = MlflowClient(store[1]).get_run(result.run_id)
    assert run.data.params["train.method"] == method and math.isfinite(run.data.metrics["loss"])


def test_gamma_auto_is_fitted_on_the_teacher_cache_logged_and_trained_with(first, store, tmp_path):
    result, lines = _run(store, "calibration.gamma=auto", "train.epochs=1")
    assert result.cache_hits["teacher shapes"] and result.cache_hits["train"] is False
    client = MlflowClient(store[1])
    run = client.get_run(result.run_id)
    gamma = run.data.metrics["calibration_gamma"]
    assert run.data.params["calibration.gamma"] == "auto" and 0 < gamma <= 1
    assert any(line.startswith(f"[calibration] gamma auto: γ = {gamma:.3f}") for line in lines), lines
    fitted = json.loads(Path(client.download_artifacts(result.run_id, "calibration.json", str(tmp_path))).read_text())
    assert fitted["gamma"] == gamma and "calibration.png" in {a.path for a in client.list_artifacts(result.run_id)}
    # the fine-tune trained with the fitted number: its cache is keyed by it
    manifests = [json.loads(m.read_text()) for m in (store[0] / "cache" / "finetune").glob("*/manifest.json")]
    assert [m["inputs"]["calibration"]["gamma"] for m in manifests].count(gamma) == 1


def test_eval_matrix_covers_every_cell_and_agrees_with_the_run(first, store, tmp_path):
    root, uri = store
    client = MlflowClient(uri)
    checkpoint = client.download_artifacts(first[0].run_id, "image_encoder.safetensors", str(tmp_path))
    shutil.rmtree(root / "cache" / "eval")  # computed again, per cell: the comparison with the run below means something
    code = main(["eval", "--tracking-uri", uri, "--set", f"cache_dir={root / 'cache'}", "--checkpoint",
                 f"agft={checkpoint}"] + _sets(TINY + [
                     "eval.matrix.attacks=[pgd, cw, apgd-ce, autoattack]", "eval.matrix.eps=[2/255, 8/255]",
                     "eval.matrix.alpha=0.5/255", "eval.matrix.steps=2"]))
    assert code == 0
    (run,) = client.search_runs([client.get_experiment_by_name("agft").experiment_id], "tags.kind = 'eval'")
    metrics = run.data.metrics
    robust = {k: v for k, v in metrics.items() if k.startswith("robust/")}
    assert len(robust) == 2 * 2 * 4 * 2 and len([k for k in metrics if k.startswith("clean/")]) == 2 * 2
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "config.yaml", "eval_matrix.csv", "eval_matrix.md", "eval_matrix.png"}
    for model in ("original", "agft"):
        for dataset in ("colours", "shapes"):
            clean = metrics[f"clean/{model}/{dataset}"]
            for attack in ("pgd-2", "cw-2", "apgd-ce-2", "autoattack"):
                weak, strong = (metrics[f"robust/{model}/{dataset}/{attack}/eps_{e}"] for e in (2, 8))
                assert clean >= weak >= strong, (model, dataset, attack)
            assert metrics[f"robust/{model}/{dataset}/autoattack/eps_2"] <= \
                metrics[f"robust/{model}/{dataset}/pgd-2/eps_2"]
    # The same attacks, ε, α, steps and seed as `agft run`'s headline (APGD-CE) and quick view (PGD): the same
    # numbers.
    run_metrics = client.get_run(first[0].run_id).data.metrics
    for dataset in ("colours", "shapes"):
        for model, role in (("original", "original"), ("agft", "finetuned")):
            assert metrics[f"robust/{model}/{dataset}/apgd-ce-2/eps_2"] == run_metrics[f"{role}_robust/{dataset}"]
            assert metrics[f"robust/{model}/{dataset}/pgd-2/eps_2"] == run_metrics[f"{role}_quick/{dataset}"]
        assert metrics[f"clean/agft/{dataset}"] == run_metrics[f"finetuned_clean/{dataset}"]


def test_autoattack_on_a_two_class_dataset_runs_without_apgd_t_and_says_so(first, store, capsys, tmp_path):
    root, uri = store
    client = MlflowClient(uri)
    eval_runs = lambda: client.search_runs([client.get_experiment_by_name("agft").experiment_id],  # noqa: E731
                                           "tags.kind = 'eval'", order_by=["attributes.start_time DESC"])
    before = len(eval_runs())
    argv = ["eval", "--tracking-uri", uri, "--set", f"cache_dir={root / 'cache'}"] + _sets(
        TINY + ["data.zero_shot=[{name: sizes, limit: 16}]", "eval.matrix.steps=2"])
    assert main(argv + ["--set", "eval.matrix.attacks=[autoattack-rand]"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "agft: error: eval.matrix.attacks: autoattack-rand needs the DLR loss, hence at least 4 classes; sizes have "
        "fewer (use autoattack, apgd-ce, pgd or cw)")
    assert len(eval_runs()) == before  # refused before the MLflow run starts
    assert main(argv + ["--set", "eval.matrix.attacks=[apgd-ce, autoattack]"]) == 0
    run = eval_runs()[0]
    table = Path(client.download_artifacts(run.info.run_id, "eval_matrix.md", str(tmp_path))).read_text()
    assert "AutoAttack on sizes (under 4 classes): APGD-CE, FAB-T and Square, without APGD-T" in table
    metrics = run.data.metrics
    assert metrics["robust/original/sizes/autoattack/eps_1"] <= metrics["robust/original/sizes/apgd-ce-2/eps_1"]
