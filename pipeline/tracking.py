"""MLflow I/O: runs, their params, per-epoch history, results and artifacts. What the results look
like (tables, CSV, plots) is pipeline/report.py."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import version
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from agft_core.catalog import is_uri
from pipeline.checkpoints import EPOCH_END
from pipeline.config.sections import ConfigError

# What a tracking server that went away raises, once MLflow's own retries are spent.
TRACKING_ERRORS = (MlflowException, requests.exceptions.RequestException)


def _flatten(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: str(value)}


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    """Next to a SQLite store, not MLflow's ./mlruns: a job's working directory is deleted after it."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None  # a tracking server decides
    return (Path(uri[len(prefix) :]).resolve().parent / "mlruns" / experiment).as_uri()


def source_tags() -> dict[str, str]:
    """Where a run's code came from, as the MLflow UI shows it (Source, Git commit): agft's version and, when it runs
    from a git checkout, the checkout's commit (a `ray job submit` package has no .git: no commit)."""
    tags = {"mlflow.source.name": f"agft {version('agft')}", "mlflow.source.type": "LOCAL"}
    try:
        found = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:  # no git on this machine
        return tags
    return tags | ({"mlflow.source.git.commit": found.stdout.strip()} if found.returncode == 0 else {})


# The MLflow UI's "Model training" view (3.17 opens an experiment in its GenAI view, kept per browser, unless the
# address asks), with the runs table's columns read from the experiment's shared view state of this key.
VIEW_KEY = "agft"
VIEW_QUERY = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
RUN_COLUMNS = (
    "params.`train.method`",
    "params.`calibration.gamma`",
    "metrics.`calibration_gamma`",
    "params.`calibration.inv_tau`",
    "params.`train.attack.eps`",
    "metrics.`finetuned_clean/mean`",
    "metrics.`finetuned_robust/mean`",
    "metrics.`val_clean_acc`",  # the last epoch's, with train.validation: a sweep's trials are compared on them
    "metrics.`val_robust_acc`",
    "attributes.`Models`",
)


def start_run(
    uri: str, experiment: str, params: dict, tags: dict[str, str], artifact_location: str | None = None
) -> str:
    # The experiment is created here, in the driver, before any worker logs to the store.
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if artifact_location and not is_uri(artifact_location):
        artifact_location = Path(artifact_location).resolve().as_uri()
    if found and artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        raise ConfigError(
            f"artifact_location: experiment {experiment!r} already keeps its artifacts at "
            f"{found.artifact_location}; set a new experiment name to use {artifact_location}"
        )
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(experiment, artifact_location or _default_artifact_location(uri, experiment))
    )
    _share_runs_view(client, experiment_id)
    run = client.create_run(experiment_id, tags=source_tags() | tags)
    flat = _flatten("", params)
    items = list(flat.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id


def _share_runs_view(client: MlflowClient, experiment_id: str) -> None:
    """The experiment's shared view VIEW_KEY: the runs table with RUN_COLUMNS. Written when missing or changed; two
    runs that start at once may both write it, and the one that loses the race starts anyway."""
    tag, view = f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps({"selectedColumns": list(RUN_COLUMNS)})
    if client.get_experiment(experiment_id).tags.get(tag) != view:
        with suppress(MlflowException):
            client.set_experiment_tag(experiment_id, tag, view)


def find_trial_run(uri: str, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    client = MlflowClient(uri)
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        f"tags.trial_id = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
    )
    return found[0].info.run_id if found else None


def trial_run(uri: str, experiment: str, parent_run_id: str, trial_id: str, params: dict, tags: dict[str, str]) -> str:
    """The nested run of one sweep trial; a trial restarted by a resumed sweep keeps its run."""
    found = find_trial_run(uri, experiment, parent_run_id, trial_id)
    if found:
        MlflowClient(uri).update_run(found, status="RUNNING")
        return found
    return start_run(
        uri,
        experiment,
        params,
        {"mlflow.parentRunId": parent_run_id, "trial_id": trial_id, "mlflow.runName": f"trial-{trial_id}", **tags},
    )


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return MlflowClient(uri).get_run(run_id).data.tags


def tag_run(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_history(uri: str, run_id: str, history: list[dict[str, float]]) -> None:
    """Logs the epochs of `history` that the run does not hold yet, each at its step and with the time
    it ended. Idempotent: a worker restarted from a checkpoint, or a rerun after a crash, adds only the
    epochs missing from the record, so every epoch appears exactly once."""
    client = MlflowClient(uri)
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    missing = [m for m in history if int(m["epoch"]) not in logged]
    metrics = [
        Metric(k, float(v), int(m.get(EPOCH_END, time.time()) * 1000), int(m["epoch"]))
        for m in missing
        for k, v in m.items()
        if k not in ("epoch", EPOCH_END)
    ]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])


def log_results(uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path]) -> None:
    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])
    for path in artifacts:
        client.log_artifact(run_id, str(path))


def log_datasets(uri: str, run_id: str, datasets: list[dict]) -> None:
    """Each dataset a run used as one of its MLflow dataset inputs: {"name", "digest", "source_type", "source"
    (a dict), "context" (training, validation or evaluation)}, so the UI can filter runs by their data."""
    MlflowClient(uri).log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                Dataset(d["name"], d["digest"], d["source_type"], json.dumps(d["source"], sort_keys=True)),
                [InputTag(MLFLOW_DATASET_CONTEXT, d["context"])],
            )
            for d in datasets
        ],
    )


def _under(uri: str, page: str) -> str:
    """A page's address on a tracking server, else its path under whatever serves the store."""
    return f"{uri.rstrip('/')}/{page}" if uri.startswith(("http://", "https://")) else page


def run_pages(uri: str, run_id: str) -> tuple[str, str]:
    """The run's page in the MLflow UI, and its experiment's training runs with agft's columns."""
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    return (
        _under(uri, f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"),
        _under(uri, f"#/experiments/{experiment_id}/runs?{VIEW_QUERY}"),
    )


def browse_hint(uri: str, run_id: str) -> list[str]:
    """Where to look at a run: its page and its experiment's runs on a tracking server, or the command that serves a
    local store and the pages it will serve (mlflow ui's default address)."""
    pages = run_pages(uri, run_id)
    if uri.startswith(("http://", "https://")):
        return list(pages)
    return [
        f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{pages[0]}",
        f"http://127.0.0.1:5000/{pages[1]}",
    ]


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status)


@contextmanager
def finishing(uri: str, run_id: str) -> Iterator[None]:
    """Ends the run FINISHED when the block completes, FAILED when it raises (the error goes on)."""
    try:
        yield
    except BaseException:
        finish_run(uri, run_id, "FAILED")
        raise
    finish_run(uri, run_id)


@contextmanager
def system_metrics(uri: str, run_id: str, node: str, interval: float) -> Iterator[None]:
    """While the block runs, this machine's CPU, memory, disk, network and NVIDIA GPU use, sampled every `interval`
    seconds and logged to the run as system/<node>/..., which the run page's System metrics tab plots. MLflow's
    monitor stops sampling at the first call the tracking server fails (it warns); the block goes on."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop lines, on every node
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval, resume_logging=True, node_id=node, tracking_uri=uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
