"""A tiny but complete `agft run`: real local Ray, real Ray Train (2 gloo workers), real MLflow store."""

import base64
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import open_clip
import pandas as pd
import pytest
import requests
import torch
from browser import chromium, close_assistant, mlflow_ui, page_text
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file
from tiny import sets
from torchvision import transforms as T

from agft_core import world
from agft_core.model import register_embedded_architectures
from pipeline import tracking
from pipeline.cli import main
from pipeline.config.loading import load_config
from pipeline.context import RunContext
from pipeline.run import run

TINY = [
    "pretrain.corpus_size=512",
    "pretrain.epochs=1",
    "pretrain.batch_size=128",
    "data.train.limit=256",
    "data.zero_shot=[{name: colours, limit: 64}, {name: shapes, limit: 64}]",
    "train.epochs=2",
    "train.batch_size=32",
    "train.num_workers=2",
    "train.validation.dataset.limit=64",
    "eval.attack.steps=2",
    "eval.quick.steps=2",
    "eval.batch_size=64",
    "system_metrics_interval=1",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return root, f"sqlite:///{root / 'mlflow.db'}"


def _run(store, *extra, rerun=()):
    root, uri = store
    cfg = load_config(None, TINY + [f"cache_dir={root / 'cache'}", *extra])
    lines = []
    return run(RunContext(cfg, uri, frozenset(rerun), log=lines.append)), lines


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
        code = main(["run", "--set", f"cache_dir={root / 'cache'}", "--summary", str(summary)] + sets(TINY))
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
    # 2 workers x 32 images, at the demo's lr (lr_scaling: none)
    assert (run.data.params["train.global_batch"], run.data.params["train.effective_lr"]) == ("64", "0.0005")
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert artifacts == {
        "config.yaml",
        "zero_shot_accuracy.csv",
        "zero_shot_accuracy.png",
        "image_encoder.safetensors",
        "timeline.json",
        "timeline.png",
    }
    timeline = json.loads(Path(client.download_artifacts(result.run_id, "timeline.json", str(tmp_path))).read_text())
    steps = [bar["step"] for bar in timeline if bar["node"] == "driver"]
    assert steps == ["pretrain", "teacher", "text", "train", "eval"]  # in order; eval tasks carry their node
    assert all(0 <= bar["start"] <= bar["end"] for bar in timeline)
    assert not any(bar["cached"] for bar in timeline)  # the first run computes everything
    history = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history)
    # the training node's system metrics, sampled every second while it trained
    cpu = client.get_metric_history(result.run_id, "system/node0/cpu_utilization_percentage")
    memory = client.get_metric_history(result.run_id, "system/node0/system_memory_usage_megabytes")
    assert cpu and all(0 <= m.value <= 100 for m in cpu)
    installed = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory and all(0 < m.value * 1e6 < installed for m in memory)  # MLflow's megabytes: 10^6 bytes
    assert history[0].timestamp - 60_000 < cpu[0].timestamp < history[-1].timestamp + 60_000
    assert {m.key for m in client.get_metric_history(result.run_id, "lr")} == {"lr"}
    # its source: agft's version and this checkout's commit
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    commit = git.stdout.strip()
    assert run.data.tags["mlflow.source.name"].startswith("agft ")
    assert run.data.tags["mlflow.source.git.commit"] == commit
    # the run page's description: what it trained, the table the console printed, how to run it again
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**AGFT** fine-tune of `agft-tiny-vit` (embedded) on `shapes`: 2 epochs, γ = 1.0")
    colours = next(r for r in result.rows if r["dataset"] == "colours")
    cells = " | ".join(f"{100 * v:.2f}" for k, v in colours.items() if k != "dataset")
    assert f"| colours | {cells} |" in re.sub(" +", " ", note)
    assert "`agft run --config config.yaml`" in note


def test_first_run_builds_every_step(first):
    result, _ = first
    assert not any(result.cache_hits.values()), result.cache_hits


@pytest.fixture(scope="module")
def second(first, store):
    """The same config run again, every cache warm."""
    return _run(store)


def test_second_run_skips_cached_steps(first, second, store):
    result, lines = second
    assert result.cache_hits and all(result.cache_hits.values()), result.cache_hits
    assert any("[teacher shapes] cached, skipping" in line for line in lines)
    assert "[eval original, finetuned] 8 of 8 shards cached, skipping" in lines  # 2 datasets x 2 encoders x 2 attacks
    assert result.run_id != first[0].run_id
    assert result.rows == first[0].rows


def _versions(store, **tags) -> list:
    """The registered versions of the model "agft" whose tags include `tags`."""
    return [
        v
        for v in MlflowClient(store[1]).search_model_versions("name = 'agft'")
        if all(v.tags.get(k) == value for k, value in tags.items())
    ]


def test_each_model_is_registered_once_and_a_warm_rerun_reuses_the_versions(first, second, store):
    """The first run registers its fine-tuned CLIP and the original it evaluated, each tagged with the accuracy
    that run measured; the second (every cache warm, the same weights) registers nothing new and says so."""
    client = MlflowClient(store[1])
    (original,) = _versions(store, role="original")
    assert original.run_id == first[0].run_id
    metrics = client.get_run(first[0].run_id).data.metrics
    (finetuned,) = [v for v in _versions(store, role="fine-tuned") if v.run_id == first[0].run_id]
    rerun, lines = second
    assert not [v for v in _versions(store) if v.run_id == rerun.run_id]
    assert (
        f"[registry] agft: version {finetuned.version} (fine-tuned, unchanged: registered by run "
        f"{first[0].run_id}), version {original.version} (original, unchanged: registered by run "
        f"{first[0].run_id})"
    ) in lines
    # a few tags a version: what it is, its mean accuracies and the run's page; the rest stays on the run
    experiment_id = client.get_run(first[0].run_id).info.experiment_id
    page = f"#/experiments/{experiment_id}/runs/{first[0].run_id}?workflowType=machine_learning"
    assert set(finetuned.tags) == {"role", "method", "model_digest", "run", "mean_clean", "mean_robust"}
    assert set(original.tags) == {"role", "model_digest", "run", "mean_clean", "mean_robust"}
    for version, model in ((finetuned, "finetuned"), (original, "original")):
        assert version.tags["run"] == page
        for column in ("clean", "robust"):
            assert float(version.tags[f"mean_{column}"]) == pytest.approx(metrics[f"{model}_{column}/mean"], abs=5e-5)
    # each run's outputs hold both models as MLflow logged models (the rerun's: those the first run logged), each
    # model with the metrics that run measured of it, and the run's own history one point per metric still
    logged = client.search_logged_models([experiment_id], f"source_run_id = '{first[0].run_id}'")
    logged = {m.name: m for m in logged}
    assert set(logged) == {"agft-fine-tuned", "agft-original"}
    for run_id in (first[0].run_id, rerun.run_id):
        outputs = {o.model_id for o in client.get_run(run_id).outputs.model_outputs}
        assert outputs == {m.model_id for m in logged.values()}
        for name, model in (("agft-fine-tuned", "finetuned"), ("agft-original", "original")):
            attached = {m.key: m.value for m in logged[name].metrics if m.run_id == run_id}
            measured = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith(f"{model}_")}
            assert attached == measured and f"{model}_robust/mean" in attached
            assert len(client.get_metric_history(run_id, f"{model}_robust/mean")) == 1


def _png(image) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _expected_probabilities(teacher: str, encoder: str | None, images: list[bytes], classnames: list[str]):
    """What the served model must answer, computed here from the teacher's weights file and the fine-tune's
    encoder file with open_clip and torch directly."""
    register_embedded_architectures()
    clip = open_clip.create_model("agft-tiny-vit", pretrained=teacher)
    if encoder:
        state = load_file(encoder)
        clip.visual.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()})
    clip.eval()
    size = clip.visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    prepare = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(clip.visual.preprocess_cfg["mean"], clip.visual.preprocess_cfg["std"]),
        ]
    )
    pixels = torch.stack([prepare(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    template = world.TASKS["shapes"].template  # the training set's: what the model answers with
    tokens = open_clip.get_tokenizer("agft-tiny-vit")([template.format(c) for c in classnames])
    with torch.no_grad():
        image = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
        return (clip.logit_scale.exp() * image @ text.T).softmax(dim=-1).numpy()


def test_registered_models_predict_what_their_weights_compute(first, store, tmp_path, monkeypatch):
    """mlflow.pyfunc.load_model of the fine-tuned and the original version: for images and class names of a
    request, the probabilities open_clip computes from the fine-tune's encoder file and the teacher's file."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[1])
    client = MlflowClient(store[1])
    (finetuned,) = [v for v in _versions(store, role="fine-tuned") if v.run_id == first[0].run_id]
    (original,) = _versions(store, role="original")
    encoder = client.download_artifacts(first[0].run_id, "image_encoder.safetensors", str(tmp_path))
    (teacher,) = (store[0] / "cache" / "pretrain").glob("*/attempt-*/clip.safetensors")
    colours = world.generate("colours", "test", 4, 0)
    images = [_png(image) for image in colours.images]
    request = pd.DataFrame({"image": images})
    served = {}
    for version, weights in ((finetuned, encoder), (original, None)):
        model = mlflow.pyfunc.load_model(f"models:/agft/{version.version}")
        answer = model.predict(request, params={"classnames": list(world.TASKS["colours"].classnames)})
        assert list(answer.columns) == list(world.TASKS["colours"].classnames)
        expected = _expected_probabilities(str(teacher), weights, images, list(answer.columns))
        np.testing.assert_allclose(answer.to_numpy(), expected, rtol=1e-4, atol=0)
        by_default = model.predict(request)  # no class names: the training set's
        assert list(by_default.columns) == list(world.TASKS["shapes"].classnames)
        served[version.tags["role"]] = load_file(
            mlflow.artifacts.download_artifacts(
                f"models:/agft/{version.version}/artifacts/clip.safetensors",
                dst_path=str(tmp_path / str(version.version)),
            )
        )
    # A tiny fine-tune moves these probabilities by little, so the weights say which tower each version serves.
    tuned, teacher_state = load_file(encoder), load_file(str(teacher))
    assert all(torch.equal(served["fine-tuned"][k], v) for k, v in tuned.items())
    assert any(not torch.equal(teacher_state[k], v) for k, v in tuned.items())
    for name, tensor in teacher_state.items():
        assert torch.equal(served["original"][name], tensor)
        if not name.startswith("visual."):
            assert torch.equal(served["fine-tuned"][name], tensor)


def test_mlflow_models_serve_answers_a_request(first, store, monkeypatch):
    """`mlflow models serve` of the registered fine-tuned version, a real server process on localhost: a JSON
    request with a base64 image and class names gets the probabilities pyfunc gives in process."""
    (version,) = [v for v in _versions(store, role="fine-tuned") if v.run_id == first[0].run_id]
    image = _png(world.generate("colours", "test", 1, 0).images[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # where mlflow's scoring server (uvicorn) is installed
    env = os.environ | {"MLFLOW_TRACKING_URI": store[1], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = store[0] / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/agft/{version.version}",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(1)
        classnames = ["red", "green", "blue"]
        response = requests.post(
            f"http://127.0.0.1:{port}/invocations",
            timeout=60,
            json={
                "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]},
                "params": {"classnames": classnames},
            },
        )
        assert response.status_code == 200, response.text
        (served,) = response.json()["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow and the uvicorn it started
        server.wait(timeout=30)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[1])
    local = mlflow.pyfunc.load_model(f"models:/agft/{version.version}").predict(
        pd.DataFrame({"image": [image]}), params={"classnames": classnames}
    )
    assert list(served) == classnames
    np.testing.assert_allclose([served[c] for c in classnames], local.iloc[0].to_numpy(), atol=1e-6)


def test_run_logs_the_datasets_it_read_as_inputs(first, second, store):
    client = MlflowClient(store[1])

    def inputs(run_id: str) -> dict:
        return {
            (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
            for d in client.get_run(run_id).inputs.dataset_inputs
        }

    first_inputs = inputs(first[0].run_id)
    assert set(first_inputs) == {
        ("shapes", "training"),
        ("colours", "validation"),
        ("colours", "evaluation"),
        ("shapes", "evaluation"),
    }
    assert first_inputs[("shapes", "training")].source_type == "code"
    assert json.loads(first_inputs[("shapes", "training")].source)["tags"]["split"] == "train"
    # a digest names the content: the training and test splits of shapes differ, and a later run on the same
    # data logs the same digests
    assert first_inputs[("shapes", "training")].digest != first_inputs[("shapes", "evaluation")].digest
    assert {k: d.digest for k, d in inputs(second[0].run_id).items()} == {k: d.digest for k, d in first_inputs.items()}


def test_rerun_eval_computes_the_same_numbers_again(first, store):
    result, lines = _run(store, rerun=("eval",))
    assert result.cache_hits["eval original, finetuned"] is False and result.cache_hits["train"] is True
    assert "[eval original, finetuned] 0 of 8 shards cached, computing 8" in lines
    assert result.rows == first[0].rows  # seeded attacks on identical caches: identical numbers


def test_changed_prompt_rebuilds_only_its_text_cache(first, store):
    result, _ = _run(
        store,
        "data.zero_shot=[{name: colours, limit: 64, templates: ['a picture of a {} shape.']},"
        " {name: shapes, limit: 64}]",
    )
    hits = result.cache_hits
    assert hits["text colours"] is False
    assert (
        hits["text shapes (train)"]
        and hits["text colours (val)"]
        and hits["teacher shapes"]
        and hits["pretrain"]
        and hits["train"]
    )


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
    uris = [
        f"cache_dir={(shared / 'cache').as_uri()}",
        f"storage_path={(shared / 'checkpoints').as_uri()}",
        f"artifact_location={(shared / 'artifacts').as_uri()}",
        "experiment=shared-storage",
    ]
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
    code = main(
        ["run", "--tracking-uri", uri, "--set", f"cache_dir={root / 'cache'}"] + sets(TINY + ["train.batch_size=200"])
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("agft: error: train.batch_size: 200 is more than the 128 images")


@pytest.mark.parametrize("method", ["tga_zsr", "fare"])
def test_baselines_that_need_the_frozen_encoder_train_under_ddp(first, store, method):
    """Attention maps (a tuple output) and unnormalised features (a keyword) through DDP's forward. They read
    the frozen encoder, not the teacher cache, which is neither checked nor built for them."""
    result, _ = _run(store, f"train.method={method}", "train.epochs=1")
    assert result.cache_hits["pretrain"] and "teacher shapes" not in result.cache_hits
    assert result.cache_hits["train"] is False
    run = MlflowClient(store[1]).get_run(result.run_id)
    assert run.data.params["train.method"] == method and math.isfinite(run.data.metrics["loss"])


def test_gamma_auto_is_fitted_on_the_teacher_cache_logged_and_trained_with(first, store, tmp_path):
    result, lines = _run(store, "calibration.gamma=auto", "train.epochs=1", "train.num_workers=1")
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


@pytest.mark.slow
def test_eval_matrix_covers_every_cell_and_agrees_with_the_run(first, store, tmp_path):
    root, uri = store
    client = MlflowClient(uri)
    checkpoint = client.download_artifacts(first[0].run_id, "image_encoder.safetensors", str(tmp_path))
    shutil.rmtree(
        root / "cache" / "eval"
    )  # computed again, per cell: the comparison with the run below means something

    def matrix(*overrides: str) -> int:
        matrix_overrides = ["eval.matrix.eps=[2/255, 8/255]", "eval.matrix.alpha=0.5/255", "eval.matrix.steps=2"]
        return main(
            [
                "eval",
                "--tracking-uri",
                uri,
                "--set",
                f"cache_dir={root / 'cache'}",
                "--checkpoint",
                f"agft={checkpoint}",
            ]
            + sets(TINY + matrix_overrides + list(overrides))
        )

    assert matrix("eval.matrix.attacks=[pgd, cw, apgd-ce]") == 0
    (run,) = client.search_runs([client.get_experiment_by_name("agft").experiment_id], "tags.kind = 'eval'")
    metrics = run.data.metrics
    robust = {k: v for k, v in metrics.items() if k.startswith("robust/")}
    assert len(robust) == 2 * 2 * 3 * 2 and len([k for k in metrics if k.startswith("clean/")]) == 2 * 2
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "config.yaml",
        "eval_matrix.csv",
        "eval_matrix.md",
        "eval_matrix.png",
        "timeline.json",
        "timeline.png",
    }
    for model in ("original", "agft"):
        for dataset in ("colours", "shapes"):
            clean = metrics[f"clean/{model}/{dataset}"]
            for attack in ("pgd-2", "cw-2", "apgd-ce-2"):
                weak, strong = (metrics[f"robust/{model}/{dataset}/{attack}/eps_{e}"] for e in (2, 8))
                assert clean >= weak >= strong, (model, dataset, attack)
    # Standard AutoAttack (APGD-T included: colours has 8 classes) on fewer images: it is most of the cost
    assert (
        matrix(
            "experiment=eval-autoattack",
            "data.zero_shot=[{name: colours, limit: 8}]",
            "eval.matrix.attacks=[pgd, autoattack]",
        )
        == 0
    )
    (strongest,) = client.search_runs(
        [client.get_experiment_by_name("eval-autoattack").experiment_id], "tags.kind = 'eval'"
    )
    for model in ("original", "agft"):
        aa = {e: strongest.data.metrics[f"robust/{model}/colours/autoattack/eps_{e}"] for e in (2, 8)}
        assert strongest.data.metrics[f"clean/{model}/colours"] >= aa[2] >= aa[8], model
        assert aa[2] <= strongest.data.metrics[f"robust/{model}/colours/pgd-2/eps_2"], model
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

    def eval_runs():
        return client.search_runs(
            [client.get_experiment_by_name("agft").experiment_id],  # noqa: E731
            "tags.kind = 'eval'",
            order_by=["attributes.start_time DESC"],
        )

    before = len(eval_runs())
    argv = ["eval", "--tracking-uri", uri, "--set", f"cache_dir={root / 'cache'}"] + sets(
        TINY + ["data.zero_shot=[{name: sizes, limit: 8}]", "eval.matrix.steps=2"]
    )
    assert main(argv + ["--set", "eval.matrix.attacks=[autoattack-rand]"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "agft: error: eval.matrix.attacks: autoattack-rand needs the DLR loss, hence at least 4 classes; sizes have "
        "fewer (use autoattack, apgd-ce, pgd or cw)"
    )
    assert len(eval_runs()) == before  # refused before the MLflow run starts
    assert main(argv + ["--set", "eval.matrix.attacks=[apgd-ce, autoattack]"]) == 0
    run = eval_runs()[0]
    table = Path(client.download_artifacts(run.info.run_id, "eval_matrix.md", str(tmp_path))).read_text()
    assert "AutoAttack on sizes (under 4 classes): APGD-CE, FAB-T and Square, without APGD-T" in table
    metrics = run.data.metrics
    assert metrics["robust/original/sizes/autoattack/eps_1"] <= metrics["robust/original/sizes/apgd-ce-2/eps_1"]


def test_the_mlflow_ui_opens_on_the_runs_and_each_run_shows_its_models_source_and_description(first, second, store):
    """A headless Chromium on `mlflow server` over the demo's store, from the links the console prints: the
    experiment lands on its training runs with agft's columns, the run page shows its logged models, source and
    description, and the registered model's page loads. Screenshots go to $AGFT_SCREENSHOTS (docs/images)."""
    shots = Path(os.environ.get("AGFT_SCREENSHOTS") or store[0] / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    uri, run_id = store[1], first[0].run_id
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    runs = len(client.search_runs([run.info.experiment_id]))  # those of the module's tests that ran before
    with mlflow_ui(uri) as address, chromium() as chrome:
        chrome.get(f"{address}/{tracking.run_pages(uri, run_id)[1]}")
        page_text(chrome, f"{runs} matching runs", "finetuned_robust/mean")
        close_assistant(chrome)
        text = page_text(chrome, "train.method")
        chrome.save_screenshot(str(shots / "experiment.png"))
        assert "/runs?" in chrome.current_url and "Traces 0" not in text  # not MLflow's GenAI overview
        for column in ("train.method", "calibration.gamma", "calibration.inv_tau", "finetuned_clean/mean"):
            assert column in text, column

        chrome.get(f"{address}/{tracking.run_pages(uri, run_id)[0]}")
        text = page_text(chrome, "Logged models (2)", "Description")
        chrome.save_screenshot(str(shots / "run.png"))
        assert run.data.tags["mlflow.source.git.commit"][:7] in text and run.data.tags["mlflow.source.name"] in text
        assert "AGFT fine-tune of agft-tiny-vit (embedded) on shapes" in text
        assert "agft-fine-tuned" in text and "agft-original" in text  # the models its metrics belong to

        chrome.get(f"{address}/#/models/agft")
        page_text(chrome, "Version 1", "Version 2")
        chrome.save_screenshot(str(shots / "registered_model.png"))
