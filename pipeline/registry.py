"""Models in MLflow: a CLIP logged as a pyfunc model (pipeline/zero_shot_model.py) and registered under the
experiment's name, one version per fine-tuned encoder and one for the original teacher it started from."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import agft_core
from agft_core.cache import local_path

MODEL_CODE = Path(__file__).with_name("zero_shot_model.py")
# What the model's code imports (agft_core.evaluate imports pyautoattack), pinned to what logged it.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "open_clip_torch",
    "safetensors",
    "huggingface_hub",
    "pyarrow",
    "numpy",
    "pandas",
    "pillow",
    "pyautoattack",
)
ORIGINAL, FINETUNED = "original", "fine-tuned"  # the versions' "role" tag


@dataclass(frozen=True)
class ServableClip:
    """What a served model is made of: the CLIP's weights (a file in the cache), the class names and prompt
    templates it answers with when a request names no classes, and one image as the input example."""

    weights: str
    arch: str
    classnames: list[str]
    templates: list[str]
    example: bytes  # an encoded image (PNG)


def signature(classnames: list[str]) -> ModelSignature:
    """Encoded images in (a binary column; base64 in a JSON request), class names as a parameter. The output
    has one column per requested class name, so it has no fixed schema."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        params=ParamSchema([ParamSpec("classnames", DataType.string, classnames, shape=(-1,))]),
    )


def register(uri: str, run_id: str, name: str, clip: ServableClip, tags: dict[str, str]) -> ModelVersion:
    """Logs `clip` as a model of the run and registers it as a new version of the registered model `name`, with
    `tags` on both."""
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory() as tmp, _working_directory(tmp):
        model_dir = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            model_dir,
            python_model=str(MODEL_CODE),
            artifacts={"clip": local_path(clip.weights)},
            model_config={"arch": clip.arch, "classnames": clip.classnames, "templates": clip.templates},
            code_paths=[str(Path(agft_core.__file__).parent)],
            signature=signature(clip.classnames),
            input_example=(pd.DataFrame({"image": [clip.example]}), {"classnames": clip.classnames}),
            # without a local build tag such as torch's +cu130, which no package index serves
            pip_requirements=[f"{package}=={version(package).split('+')[0]}" for package in REQUIREMENTS],
        )
        logged = client.create_logged_model(
            experiment_id, name=f"{name}-{tags['role']}", source_run_id=run_id, tags=tags
        )
        try:
            client.log_model_artifacts(logged.model_id, str(model_dir))
        except BaseException:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
    try:
        client.create_registered_model(
            name,
            description="AGFT fine-tuned CLIPs (role fine-tuned) and the teachers they started from (role original)",
        )
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # The artifacts' location, not models:/<model_id>: a registry store resolves that through the process's
    # global tracking URI, which need not be this client's.
    return client.create_model_version(name, logged.artifact_location, run_id, tags=tags, model_id=logged.model_id)


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """The block runs in `path`, then back where the process was, even if that directory is gone. MLflow's
    save_model reads the working directory, and a job's driver runs in its package directory, which Ray's
    runtime-env agent of another raylet sharing the disk (several nodes on one machine) can delete mid-job."""
    previous = os.open(".", os.O_RDONLY)  # a handle on the directory, deleted or not
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(previous)
        os.close(previous)


def logged_model_id(uri: str, version: ModelVersion) -> str | None:
    """The logged model a version was registered from: the one whose artifacts are the version's source (a version
    made from an artifact location does not keep the model's id)."""
    client = MlflowClient(uri)
    experiment_id = client.get_run(version.run_id).info.experiment_id
    found = client.search_logged_models([experiment_id], f"source_run_id = '{version.run_id}'")
    return next((logged.model_id for logged in found if logged.artifact_location == version.source), None)


def link(uri: str, run_id: str, version: ModelVersion, metric_keys: list[str]) -> None:
    """The version's logged model as one of the run's outputs (the run page's "Logged models"; also when an earlier
    run logged it), with the run's metrics of it attached (the model page's metrics) at their own timestamps: a SQL
    store (SQLite, PostgreSQL, behind a server or not) keeps one point of each in the run's history, a file store
    two."""
    model_id = logged_model_id(uri, version)
    if model_id is None:  # a version an older agft registered from another source
        return
    client = MlflowClient(uri)
    if model_id not in {output.model_id for output in client.get_run(run_id).outputs.model_outputs}:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    history = [m for key in metric_keys for m in client.get_metric_history(run_id, key)]
    client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in history])


def registered_version(uri: str, name: str, model_digest: str) -> ModelVersion | None:
    """The version of `name` that computes with these weights (its model_digest tag), if there is one (the first,
    if two runs registered it at once)."""
    found = MlflowClient(uri).search_model_versions(f"name = '{name}' and tags.model_digest = '{model_digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def keep_first(uri: str, mine: ModelVersion, model_digest: str) -> ModelVersion:
    """A model is registered when no version of its weights is found, so two runs that looked at once register
    one each. Each then keeps the first version, deleting its own if it is not that one: one remains, whatever
    the order."""
    first = registered_version(uri, mine.name, model_digest)
    if first is None or first.version == mine.version:  # None: a registry whose search lags its writes
        return mine
    client = MlflowClient(uri)
    model_id = logged_model_id(uri, mine)
    client.delete_model_version(mine.name, mine.version)
    if model_id:
        client.delete_logged_model(model_id)
    return first
