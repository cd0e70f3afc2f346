"""`ray job submit` round trip against a real head started here, with token authentication on."""
import re
import secrets
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ray_cluster import ray_cli, ray_cluster

REPO = Path(__file__).resolve().parent.parent
TINY = ["pretrain.corpus_size=256", "pretrain.epochs=1", "pretrain.batch_size=64", "data.train.limit=128",
        "data.zero_shot=[{name: colours, limit: 32}]", "train.epochs=1", "train.batch_size=32",
        "train.validation=null", "eval.attack.steps=1"]


@pytest.fixture(scope="module")
def head():
    with ray_cluster(head_cpus=2) as cluster:
        yield cluster.dashboard, cluster.env, cluster.temp


def _submit(address, env, tmp_path, *overrides) -> str:
    submission = f"agft-{secrets.token_hex(4)}"
    args = ["run", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", f"cache_dir={tmp_path / 'c'}"]
    for o in TINY + list(overrides):
        args += ["--set", o]
    result = ray_cli("job", "submit", "--address", address, "--submission-id", submission, "--working-dir", str(REPO),
                     "--runtime-env", str(REPO / "deploy" / "runtime_env.yaml"), "--no-wait", "--", "agft", *args, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return submission


def _wait(address, env, submission, timeout=300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = ray_cli("job", "status", "--address", address, submission, env=env)
        status = re.search(r"Job '[^']+' (succeeded|failed|stopped)", result.stdout + result.stderr)
        if status:
            return status.group(1).upper()
        time.sleep(3)
    raise AssertionError(f"job {submission} did not finish in {timeout}s")


def test_job_submission_runs_agft_and_writes_mlflow(head, tmp_path):
    address, env, temp = head
    submission = _submit(address, env, tmp_path)
    status = _wait(address, env, submission)
    logs = ray_cli("job", "logs", "--address", address, submission, env=env).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("agft").experiment_id])
    assert run.info.status == "FINISHED" and "finetuned_robust/colours" in run.data.metrics
    assert f"MLflow run: {run.info.run_id}" in logs
    # artifacts next to the store, not in the job's working directory, which Ray deletes later
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    assert "image_encoder.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id)}
    packages = list(Path(temp).glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*[0-9a-f]"))
    files = {f: f.stat().st_size for p in packages for f in p.rglob("*")
             if f.is_file() and "__pycache__" not in f.parts}
    size = sum(files.values())
    print(f"uploaded working_dir package {[p.name for p in packages]}: {len(files)} files, {size / 1024:.0f} KiB")
    # sources only: no venv, caches, checkpoints or MLflow stores
    assert 0 < size < 1024**2, sorted(files.items(), key=lambda kv: -kv[1])[:5]


def test_invalid_config_fails_at_once_with_the_error_in_the_logs(head, tmp_path):
    address, env, _ = head
    submission = _submit(address, env, tmp_path, "calibration.gamma=2")
    assert _wait(address, env, submission, timeout=120) == "FAILED"
    logs = ray_cli("job", "logs", "--address", address, submission, env=env).stdout
    assert "agft: error:" in logs and "calibration.gamma" in logs


def test_submission_without_the_token_is_refused(head):
    address, env, _ = head
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    result = ray_cli("job", "list", "--address", address, env=no_token)
    assert result.returncode != 0
    assert re.search(r"401|[Uu]nauthori[sz]ed|token", result.stdout + result.stderr)
