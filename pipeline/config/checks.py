"""Checks of a valid config against the world, before any work: data roots and weights files (run where the data
is, as a Ray task), the tracking server and the Ray address (probed over the network)."""

from __future__ import annotations

import os
from pathlib import Path

from agft_core import catalog
from pipeline.config.schema import Config
from pipeline.config.sections import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def preflight(cfg: Config) -> None:
    """Checks against the file system, run where the data is (a Ray task): roots and weights must exist."""
    from agft_core.model import cached_pretrained, missing_pretrained_message

    validation = [("train.validation.dataset", cfg.train.validation.dataset)] if cfg.train.validation else []
    for where, dataset in [("data.train", cfg.data.train), *validation] + [
        (f"data.zero_shot.{i}", d) for i, d in enumerate(cfg.data.zero_shot)
    ]:
        problem = catalog.check_root(dataset.spec(cfg.data.world_seed))
        if problem:
            raise ConfigError(f"{where}: {problem}")
    for name, path in cfg.eval.matrix.checkpoints.items():
        if not Path(path).is_file():
            raise ConfigError(f"eval.matrix.checkpoints.{name}: weights file {path} does not exist")
    model = cfg.model
    if model.weights_file and not Path(model.weights_file).is_file():
        raise ConfigError(f"model.weights: weights file {model.weights_file} does not exist")
    if (
        model.weights not in ("embedded", "random")
        and not model.weights_file
        and cached_pretrained(model.arch, model.weights) is None
    ):
        raise ConfigError(f"model.weights: {missing_pretrained_message(model.arch, model.weights)}")


def check_sweep(cfg: Config) -> None:
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; add axes such as calibration.gamma: {choice: [0.2, 0.4, 0.7]}")
    if cfg.sweep.metric.startswith("val_") and cfg.train.validation is None:
        raise ConfigError(
            f"train.validation: required for sweep.metric {cfg.sweep.metric}; "
            "set a held-out dataset, e.g. {dataset: {name: colours, split: train, limit: 256}}"
        )


def on_cluster(address: str | None) -> bool:
    """Whether the driver attaches to a running cluster (--address, or RAY_ADDRESS as `ray job submit`
    sets it) rather than starting its own local Ray."""
    return (address or os.environ.get("RAY_ADDRESS") or "local") != "local"


def tracking_uri(flag: str | None, cluster: bool = False) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    A relative SQLite path is made absolute: Ray workers run in other directories. On a cluster it
    is refused: it names a file on one node (under `ray job submit`, in the job's package directory,
    which Ray deletes), and a rank-0 worker on another node would write its own empty store.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        if cluster:
            raise ConfigError(
                f"--tracking-uri: {uri} is a file relative to the driver, which on a cluster is one "
                f"node's disk; use a tracking server (http://host:5000) or an absolute sqlite:////path "
                f"on storage every node mounts"
            )
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


PROBE_TIMEOUT_S = 5
# A server that accepted the connection is there: a busy one (a single worker checking basic-auth password hashes)
# answered a loaded test machine's probe after more than PROBE_TIMEOUT_S, and the run refused to start.
REPLY_TIMEOUT_S = 60


def check_tracking(uri: str) -> None:
    """Before any work: a tracking server that does not answer, or refuses our credentials, would
    otherwise fail the run only after MLflow's retries (minutes), or after training."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise ConfigError(f"--tracking-uri: {uri}: folder {folder} does not exist")
        return
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    auth = (
        (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        if os.environ.get("MLFLOW_TRACKING_USERNAME")
        else None
    )
    try:
        reply = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "Default"},
            auth=auth,
            timeout=(PROBE_TIMEOUT_S, REPLY_TIMEOUT_S),
        )
    except requests.RequestException as exc:
        raise ConfigError(
            f"--tracking-uri: no tracking server answers at {uri} ({type(exc).__name__}); start it, "
            f"or pass the URI of one that runs"
        ) from None
    if reply.status_code in (401, 403):
        raise ConfigError(
            f"--tracking-uri: {uri} refused the credentials (HTTP {reply.status_code}); set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if reply.status_code >= 500:
        raise ConfigError(f"--tracking-uri: {uri} answered HTTP {reply.status_code}; is it an MLflow server?")


def check_ray_address(address: str | None) -> None:
    """Before any work: ray.init on an address where nothing listens retries for a long while."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # local, auto, or none: Ray finds or starts its cluster
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"--address: no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}); "
            f"start one (ray start --head) or pass the head's GCS address, host:6379"
        ) from None
