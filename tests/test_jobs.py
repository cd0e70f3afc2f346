"""`ray job submit` against real Ray clusters started here (token auth on): a single head, and a
multi-node cluster with declared GPUs logging to a real MLflow server."""

import json
import os
import re
import secrets
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from file_audit import opened_under, traced
from mlflow.tracking import MlflowClient
from mlflow_server import mlflow_server, status_without_credentials
from PIL import Image
from ray_cluster import dashboard_api, ray_cli, ray_cluster, state
from tiny import ONE_ZERO_SHOT, TEACHER, sets

REPO = Path(__file__).resolve().parent.parent
TINY = [
    *TEACHER,
    "data.train.limit=128",
    ONE_ZERO_SHOT,
    "train.epochs=1",
    "train.batch_size=32",
    "train.validation=null",
    "eval.attack.steps=1",
    "eval.quick=null",
]


@pytest.fixture(scope="module")
def head():
    # 3 CPUs: the trainer's 2 workers and one eval task fit at once, so the original's eval runs beside
    # the fine-tune (declared; Ray does not check them against the machine's cores). With Ray Train's preemption
    # watcher, as on a user's cluster: the job's log is checked for its noise.
    with ray_cluster(head_cpus=3, preemption_watcher=True) as cluster:
        yield cluster.dashboard, cluster.env, cluster.temp


def _runtime_env(tmp_path: Path, env_vars: dict[str, str]) -> Path:
    """deploy/runtime_env.yaml with more environment variables for the job."""
    runtime_env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"] |= env_vars
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(runtime_env))
    return path


# Ray's driver folds log lines that differ only in numbers (train rank 0 and 1) into one and can print the
# second only after its job ended; the tests that count every step's warning turn that off.
EVERY_LINE = {"RAY_DEDUP_LOGS": "0"}


def _job_submit(address: str, submission: str, runtime_env: Path, command: list[str], env: dict):
    """`ray job submit --no-wait` of command, with this repository as the working directory."""
    return ray_cli("job", "submit", "--address", address, "--submission-id", submission, "--working-dir", str(REPO),
                   "--runtime-env", str(runtime_env), "--no-wait", "--", *command, env=env)  # fmt: skip


def _submit(address, env, tmp_path, *overrides, runtime_env: Path = REPO / "deploy" / "runtime_env.yaml") -> str:
    submission = f"agft-{secrets.token_hex(4)}"
    args = ["run", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", f"cache_dir={tmp_path / 'c'}"]
    for o in TINY + list(overrides):
        args += ["--set", o]
    result = _job_submit(address, submission, runtime_env, ["agft", *args], env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return submission


FINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # a job's states once it has ended


def _wait(address, env, submission, timeout=600) -> str:  # a loaded CI machine took 304 s for a tiny run
    deadline, answer = time.time() + timeout, None
    while time.time() < deadline:
        try:  # a dashboard busy or restarting answers the next poll
            answer = dashboard_api(address, env, f"/api/jobs/{submission}")
        except requests.RequestException as exc:
            answer = exc
        if isinstance(answer, requests.Response) and answer.ok and answer.json()["status"] in FINAL:
            return answer.json()["status"]
        time.sleep(1)  # one HTTP call to the dashboard: a poll costs next to nothing, a late one a wait
    raise AssertionError(f"job {submission} did not finish in {timeout}s (last answer: {answer})")


@pytest.mark.slow
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
    experiment = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs"
    page = f"{experiment}/{run.info.run_id}?workflowType=machine_learning"
    assert f"Browse it:  mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}, then {page}" in logs
    assert f"All runs:   {experiment}?workflowType=machine_learning&viewStateShareKey=agft" in logs
    # the console as a log file shows it: each epoch once (rank 0), no Ray Train chatter, no carriage returns
    assert logs.count("[train] epoch 1/") == 1 and "Reporting training result" not in logs
    assert "Wrapping provided model in DistributedDataParallel" not in logs and "\r" not in logs
    assert "PreemptionWatcher" not in logs  # Ray Train's ERROR line about its own actor (cli.RAY_NOISE)
    # artifacts next to the store, not in the job's working directory, which Ray deletes later
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    assert {"image_encoder.safetensors", "timeline.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # a DAG, not a script: the teacher's eval ran while the fine-tune trained (the cluster holds both)
    timeline = json.loads(Path(client.download_artifacts(run.info.run_id, "timeline.json", str(tmp_path))).read_text())
    (train,) = [bar for bar in timeline if bar["step"] == "train"]
    originals = [bar for bar in timeline if bar["step"].startswith("eval colours [") and "(original," in bar["step"]]
    assert any(bar["start"] < train["end"] and bar["end"] > train["start"] for bar in originals), timeline
    # and the teacher cache and the text caches, which do not depend on each other, were built at once: each
    # build was under way while the other was (a script with barriers would start one after the other ended).
    # Their tasks need not overlap: which of them a full cluster starts first is Ray's choice.
    (teacher,) = [bar for bar in timeline if bar["step"] == "teacher"]
    (text,) = [bar for bar in timeline if bar["step"] == "text"]
    assert teacher["start"] < text["end"] and text["start"] < teacher["end"], timeline
    assert len([bar for bar in timeline if bar["step"].startswith("teacher shard")]) == 2
    packages = list(Path(temp).glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*[0-9a-f]"))
    files = {
        f: f.stat().st_size for p in packages for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
    }
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
    for request in (["submit", "--no-wait", "--", "true"], ["list"]):
        result = ray_cli("job", request[0], "--address", address, *request[1:], env=no_token)
        assert result.returncode != 0
        assert re.search(r"Authentication failed|401|[Uu]nauthori[sz]ed", result.stdout + result.stderr)


# -- the real path on a multi-node "GPU" cluster, logging to a real tracking server --------------


def _imagefolder(root: Path) -> None:
    """Three colours in torchvision's ImageFolder layout, train and test splits."""
    for split, count in (("train", 8), ("test", 4)):
        for name, rgb in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + np.random.default_rng(i).integers(-20, 20, (40, 40, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_the_driver_audit_sees_what_native_code_opens(tmp_path):
    """The check the real-path job relies on: safetensors (Rust) and pyarrow (C++) reads are seen, not only
    Python's open()."""
    import subprocess
    import sys

    from agft_core.model import create_clip, save_weights

    weights, data, log = tmp_path / "w" / "teacher.safetensors", tmp_path / "data", tmp_path / "opens.log"
    weights.parent.mkdir()
    save_weights(create_clip("agft-tiny-vit", None), weights, "agft-tiny-vit")
    for root in (data, tmp_path / "data-other"):
        root.mkdir()
        (root / "labels.bin").write_bytes(b"x")
    script = (
        f"from agft_core.model import create_clip; from agft_core.cache import file_sha256; "
        f"create_clip('agft-tiny-vit', {str(weights)!r}); file_sha256({str(data / 'labels.bin')!r})"
    )
    subprocess.run(traced([sys.executable, "-c", script], log), check=True, cwd=REPO, timeout=300)
    assert opened_under(log, [weights]) and opened_under(log, [data])
    # a root is a directory, not a prefix: data-other was not read
    subprocess.run(
        traced([sys.executable, "-c", f"open({str(tmp_path / 'data-other' / 'labels.bin')!r}).read()"], log),
        check=True,
        timeout=60,
    )
    assert opened_under(log, [tmp_path / "data-other"]) and not opened_under(log, [data])


@pytest.fixture(scope="module")
def gpu_cluster():
    """A 1-CPU head (where `ray job submit` runs the driver) and two worker nodes declaring one GPU each."""
    with ray_cluster(head_cpus=1, workers=[{"num-cpus": 2, "num-gpus": 1}] * 2) as cluster:
        yield cluster


@pytest.mark.slow
def test_real_path_job_on_a_multi_node_gpu_cluster_logs_to_a_tracking_server(gpu_cluster, tmp_path):
    """A run as a user with a GPU cluster would first try it: `train.use_gpu` and GPU tasks, on nodes whose GPUs
    have no CUDA, with resources.cpu_fallback. The job finishes, every GPU step saying that it computed on the
    CPU. (The embedded default's job on these nodes asserted the same and was merged into this one for CI time.)"""
    from agft_core.model import create_clip, save_weights

    data, weights, audit = tmp_path / "toys", tmp_path / "teacher.safetensors", tmp_path / "driver-opens.log"
    _imagefolder(data)
    save_weights(create_clip("agft-tiny-vit", None), weights, "agft-tiny-vit")
    with mlflow_server() as server:
        assert status_without_credentials(server.uri) == 401
        runtime_env = _runtime_env(tmp_path, server.client_env | EVERY_LINE)  # driver and workers log to the server
        overrides = [
            f"model.weights={weights}",
            f"cache_dir={tmp_path / 'cache'}",
            f"data.train={{kind: imagefolder, name: toys, split: train, root: {data}}}",
            f"data.zero_shot=[{{kind: imagefolder, name: toys, split: test, root: {data}}}]",
            "train.use_gpu=true",
            "train.num_workers=2",
            "train.epochs=1",
            "train.batch_size=8",
            "train.warmup_epochs=0",
            "train.validation=null",
            "resources.task_gpus=0.5",
            "resources.loader_workers=1",
            "resources.cpu_fallback=true",
            "eval.attack.steps=1",
            "eval.quick=null",
        ]
        args = traced(["agft", "run", "--tracking-uri", server.uri, "--verbose"] + sets(overrides), audit)
        submission = f"agft-gpu-{secrets.token_hex(4)}"
        submitted = _job_submit(gpu_cluster.dashboard, submission, runtime_env, args, gpu_cluster.env)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
        status = _wait(gpu_cluster.dashboard, gpu_cluster.env, submission, timeout=600)
        logs = ray_cli("job", "logs", "--address", gpu_cluster.dashboard, submission, env=gpu_cluster.env).stdout
        assert status == "SUCCEEDED", logs[-4000:]

        # the tracking server holds the run, its metrics and (behind the server) its artifacts
        os.environ.update(server.client_env)
        try:
            client = MlflowClient(server.uri)
            (run,) = client.search_runs([client.get_experiment_by_name("agft").experiment_id])
            assert run.info.status == "FINISHED" and "finetuned_robust/toys" in run.data.metrics
            assert "image_encoder.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id)}
            assert list(server.artifacts.rglob("image_encoder.safetensors"))
            # the fine-tuned and the original CLIP as versions of the registry's "agft", on PostgreSQL, their
            # files behind the server
            roles = {v.tags["role"]: v for v in client.search_model_versions("name = 'agft'")}
            assert set(roles) == {"fine-tuned", "original"}
            assert {v.run_id for v in roles.values()} == {run.info.run_id}
            assert len(list(server.artifacts.rglob("clip.safetensors"))) == 2
            experiment = run.info.experiment_id
            page = f"{server.uri}/#/experiments/{experiment}/runs/{run.info.run_id}?workflowType=machine_learning"
            assert f"Browse it:  {page}" in logs
        finally:
            for key in server.client_env:
                os.environ.pop(key)

    # the driver read neither data nor weights, by any library; tasks did
    assert audit.read_text() and not opened_under(audit, [data, weights])
    teacher_rows = pq.ParquetDataset(sorted((tmp_path / "cache" / "teacher").glob("*/attempt-*/part-*.parquet"))).read()
    assert teacher_rows.num_rows == 24

    nodes = {n["node_id"]: n for n in state(gpu_cluster, "nodes") if n["state"] == "ALIVE"}
    workers = {node_id for node_id, n in nodes.items() if not n["is_head_node"]}
    assert len(workers) == 2
    tasks = [t for t in state(gpu_cluster, "tasks") if t["func_or_class_name"] in ("teacher_shard", "evaluate_shard")]
    assert {t["func_or_class_name"] for t in tasks} == {"teacher_shard", "evaluate_shard"}
    for task in tasks:
        assert task["required_resources"].get("GPU") == 0.5 and task["node_id"] in workers
    trainers = [a for a in state(gpu_cluster, "actors") if a["class_name"] == "RayTrainWorker"]
    assert {a["node_id"] for a in trainers} == workers  # one train worker on each GPU node

    # declared GPUs without CUDA: every GPU step said it fell back to the CPU instead of crashing
    _assert_every_gpu_step_fell_back(logs)
    assert "Reporting training result" in logs  # --verbose: Ray Train's INFO is back


def _assert_every_gpu_step_fell_back(logs: str) -> None:
    for step in (
        "[text cache] WARNING: Ray granted GPU",
        "[teacher cache] WARNING: Ray granted GPU",
        "[eval] WARNING: Ray granted GPU",
        "[train rank 0] WARNING: Ray granted GPU",
        "[train rank 1] WARNING: Ray granted GPU",
        "[train] WARNING: train.use_gpu, but CUDA is not available",
    ):
        assert step in logs, step


# A job's driver and a task on each node: where each runs, and whether the driver's working directory outlived
# the other nodes' set-up of the same package.
WHERE_EACH_NODE_RUNS = """import os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
@ray.remote(num_cpus=0)
def here():
    return os.getcwd()
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
folders = ray.get([here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
                   for n in nodes])
print("distinct:", len(set(folders)) == len(nodes), "driver cwd:", os.getcwd())
"""


def test_each_node_unpacks_a_job_package_in_its_own_directory(gpu_cluster, tmp_path):
    """Two `ray job submit`s of one checkout back to back once lost the second driver's working directory (its
    os.getcwd() failed in MLflow's store set-up): the worker nodes' runtime-env agents, sharing the head's temp
    dir on this one machine, deleted and unpacked again the package the driver ran in. A package no node has
    seen (a new file in it) makes every agent unpack it: the driver's directory must survive that."""
    (tmp_path / "probe.py").write_text(WHERE_EACH_NODE_RUNS)
    (tmp_path / "nonce").write_text(secrets.token_hex(8))
    done = ray_cli(
        "job",
        "submit",
        "--address",
        gpu_cluster.dashboard,
        "--working-dir",
        str(tmp_path),
        "--",
        "python",
        "probe.py",
        env=gpu_cluster.env,
        timeout=300,
    )
    assert done.returncode == 0 and "distinct: True driver cwd:" in done.stdout, (done.stdout + done.stderr)[-3000:]
    assert len(set(gpu_cluster.node_temps)) == 3


def test_gpus_asked_for_on_nodes_without_cuda_are_refused_before_any_work(gpu_cluster, tmp_path):
    """`train.use_gpu` and GPU tasks on nodes whose GPUs have no CUDA, without resources.cpu_fallback: one
    line naming the setting, exit 2, and no cache or tracking store written (not hours on the CPUs)."""
    submission = _submit(
        gpu_cluster.dashboard, gpu_cluster.env, tmp_path, "train.use_gpu=true", "resources.task_gpus=0.5"
    )
    assert _wait(gpu_cluster.dashboard, gpu_cluster.env, submission) == "FAILED"
    status = ray_cli("job", "status", "--address", gpu_cluster.dashboard, submission, env=gpu_cluster.env)
    logs = ray_cli("job", "logs", "--address", gpu_cluster.dashboard, submission, env=gpu_cluster.env).stdout
    errors = [line for line in logs.splitlines() if line.startswith("agft: error")]
    assert len(errors) == 1 and errors[0].startswith(
        "agft: error: resources.cpu_fallback: train.use_gpu and resources.task_gpus=0.5 ask for GPUs, and node "
    ), logs
    assert "Traceback" not in logs and "exit code 2" in status.stdout + status.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "mlflow.db").exists()
