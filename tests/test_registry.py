"""What runs register: the original teacher once per weights digest, also when two runs register it at once; nothing
while a cell is incomplete."""

import io

from mlflow.tracking import MlflowClient
from PIL import Image

from agft_core.model import create_clip, save_weights
from pipeline import registry


def test_two_runs_that_registered_the_original_at_once_leave_one_version(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("agft", artifact_location=(tmp_path / "mlruns").as_uri())
    weights, example = tmp_path / "clip.safetensors", io.BytesIO()
    save_weights(create_clip("agft-tiny-vit", None), weights, "agft-tiny-vit")
    Image.new("RGB", (32, 32)).save(example, format="PNG")
    clip = registry.ServableClip(str(weights), "agft-tiny-vit", ["red", "blue"], ["a {}."], example.getvalue())

    def register_original(digest: str):
        """What a run does once it found no original registered."""
        run_id = client.create_run(experiment_id).info.run_id
        return registry.register(uri, run_id, "agft", clip, {"role": registry.ORIGINAL, "model_digest": digest})

    other_teacher = register_original("b" * 16)
    # both runs looked, found none and registered: the race's worst order, each checks after both registered
    first, second = (register_original("a" * 16) for _ in range(2))
    assert registry.keep_first(uri, second, "a" * 16).version == first.version
    assert registry.keep_first(uri, first, "a" * 16).version == first.version
    remaining = client.search_model_versions("name = 'agft'")
    assert sorted(int(v.version) for v in remaining) == sorted(int(v.version) for v in (other_teacher, first))
    assert registry.registered_version(uri, "agft", "a" * 16).version == first.version
    # the deleted version's logged model went with it
    assert {m.artifact_location for m in client.search_logged_models([experiment_id])} == {
        other_teacher.source,
        first.source,
    }


def test_the_console_names_the_run_page_and_the_experiments_runs_view(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pages")
    run = client.create_run(experiment).info.run_id
    assert tracking.browse_hint(uri, run) == [
        f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/"
        f"#/experiments/{experiment}/runs/{run}?workflowType=machine_learning",
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey=agft",
    ]


def test_a_run_with_an_incomplete_cell_registers_nothing_and_says_so(tmp_path):
    """A version's tags hold the run's mean accuracies: with a cell incomplete (an eval shard failed after its
    retries) there is no mean to tag it with, and the run goes on to its one-line error instead of crashing here."""
    from pipeline.config.loading import load_config
    from pipeline.context import RunContext
    from pipeline.stages.evaluate import INCOMPLETE
    from pipeline.stages.publish import register_models

    uri, lines = f"sqlite:///{tmp_path / 'mlflow.db'}", []
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("agft")).info.run_id
    ctx = RunContext(load_config(None, [f"cache_dir={tmp_path / 'cache'}"]), uri, log=lines.append)
    cells = {"finetuned_clean": 0.5, "finetuned_robust": INCOMPLETE}
    rows = [{"dataset": "colours", **cells}, {"dataset": "mean", **cells}]
    register_models(ctx, None, run_id, rows, str(tmp_path / "encoder.safetensors"))
    assert lines == [
        "[registry] nothing registered: some cells are incomplete; the rerun that completes them registers"
    ]
    assert client.search_registered_models() == []
