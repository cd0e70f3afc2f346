"""Faults injected for real: a SIGKILLed Ray Train worker or driver, a tracking server that dies, two runs
building one cache at once. Real processes, signals and servers; nothing is mocked."""

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from mlflow_server import start_mlflow
from ray.util.state import list_actors
from ray_cluster import agft_command, free_port, ray_cluster
from safetensors.torch import load_file
from tiny import ONE_ZERO_SHOT, TEACHER, sets

from agft_core.cache import CacheEntry
from pipeline import tracking
from pipeline.checkpoints import ENCODER_FILE, HISTORY_FILE, newest_checkpoint
from pipeline.cli import main
from pipeline.config.loading import load_config
from pipeline.context import RunContext
from pipeline.run import prepare
from pipeline.stages import finetune
from pipeline.trainer import fit, read_history

TINY = [
    *TEACHER,
    "data.train.limit=256",
    ONE_ZERO_SHOT,
    "train.epochs=3",
    "train.batch_size=32",
    "train.num_workers=2",  # the worker-kill test's DDP group; the other tests train one worker (ONE_WORKER)
    "train.validation=null",
    "eval.attack.steps=2",
    "eval.quick=null",
    "eval.batch_size=64",
]
# Where the fault is not in the worker group, one worker trains: a second tests nothing more there, and its process
# (imports, DDP) doubled what the train workers cost: 28 CPU-s against 14 in each tracking-server test, 53 against
# 24 in the killed-driver test (bench/suite_cpu.py --by-test, 2026-12-07, 2 cores).
ONE_WORKER = "train.num_workers=1"


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("checkpoint_*") if p.is_dir())


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def _train_worker_pids() -> set[int]:
    # the address named: with tests in parallel, "any running local Ray" may be another test process's
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return {a.pid for a in actors}


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(None, TINY + [f"cache_dir={root / 'cache'}"])
    return root, uri, cfg


def _train(prepared, name: str, while_training=None):
    root, uri, cfg = prepared
    run_id = tracking.start_run(uri, "faults", {}, {})
    ctx = RunContext(cfg, uri, log=lambda line: None)
    inputs = finetune.inputs(ctx, prepare(ctx, training=True), run_id)
    result = {}
    trainer = threading.Thread(target=lambda: result.update(checkpoint=fit(inputs, str(root / "train"), name)))
    trainer.start()
    if while_training:
        while_training(root / "train" / name)
    trainer.join()
    with result["checkpoint"].as_directory() as d:
        return run_id, read_history(f"{d}/{HISTORY_FILE}"), load_file(f"{d}/{ENCODER_FILE}")


@pytest.mark.slow
def test_a_sigkilled_train_worker_is_replaced_and_the_run_equals_an_uninterrupted_one(prepared, capfd):
    """SIGKILL one Ray Train worker process in the middle of epoch 2. Ray Train restarts the worker
    group from the epoch-1 checkpoint; epochs are seeded by (seed, epoch, rank), so the resumed run
    replays epochs 2 and 3 exactly: the final weights equal those of an uninterrupted run, bit for bit,
    and each epoch is in the history and in MLflow once. The console says so in one line, no traceback."""
    _, uri, _ = prepared
    killed = {}

    def kill_a_worker_mid_epoch_2(storage: Path):
        _wait_for(lambda: _checkpoints(storage), 300, "the epoch-1 checkpoint")
        time.sleep(0.5)  # into epoch 2 (an epoch takes several seconds here)
        pids = _wait_for(_train_worker_pids, 30, "the train workers")
        killed["pid"] = min(pids)
        os.kill(killed["pid"], signal.SIGKILL)
        killed["checkpoints_then"] = len(_checkpoints(storage))

    reference_run, reference_history, reference = _train(prepared, "uninterrupted")
    run_id, history, weights = _train(prepared, "killed", kill_a_worker_mid_epoch_2)

    assert killed["checkpoints_then"] == 1, "the worker should die during epoch 2, after one checkpoint"
    time.sleep(1)  # Ray's driver forwards the workers' lines in batches
    console = "".join(capfd.readouterr())
    failures = [line for line in console.splitlines() if "worker failure" in line]
    assert len(failures) == 1 and re.search(
        r"\[train\] worker failure \(rank \d's process died\): (resuming from "
        r"the epoch-1 checkpoint|restarting from epoch 1)",
        failures[0],
    ), console
    assert "Traceback" not in console and "A worker died" not in console and "gloo" not in console, console
    assert killed["pid"] not in _train_worker_pids()
    # the Ray agft starts for itself (local_ray_options, as ray_local is) has no autoscaler to drain a node, and
    # its fine-tunes run no preemption watcher: restarting the worker group did not need one
    watchers = list_actors(
        address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "PreemptionWatcher")]
    )
    assert not watchers, watchers
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")] == [1, 2, 3]
    # train.keep_checkpoints of the 3, and no checkpoint of the attempt the kill interrupted
    assert len(_checkpoints(prepared[0] / "train" / "killed")) == 2
    assert reference.keys() == weights.keys()
    different = [k for k in reference if not torch.equal(reference[k], weights[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    for ours, theirs in zip(history, reference_history):
        assert ours["loss"] == theirs["loss"] and ours["train_robust_acc"] == theirs["train_robust_acc"]


def _checkpointed(cache: Path) -> bool:
    """Whether a fine-tune in the cache's Ray Train storage has a complete checkpoint, as a resumed run finds it."""
    return any(newest_checkpoint(str(run)) for run in (cache / "ray_train").glob("finetune-*"))


def _start_mlflow(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on a SQLite store; restarting it on the same port and store is the same server."""
    store = ["--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
    return start_mlflow(store + ["--artifacts-destination", (root / "art").as_uri()], port, root / "server.log")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_run_and_comes_back_loses_nothing(prepared, tmp_path):
    """The server is SIGKILLed after epoch 1 is logged and restarted after epoch 2's checkpoint: training
    goes on meanwhile (the rank-0 worker warns and keeps the epoch), and the record ends with every
    epoch exactly once, epoch 2 included, at the time it was trained."""
    cfg = load_config(None, [*TINY, f"cache_dir={prepared[2].cache_dir}", ONE_WORKER])
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow(tmp_path, port)
    try:
        run_id = tracking.start_run(uri, "server-fault", {}, {})
        ctx = RunContext(cfg, uri, log=lambda line: None)
        prepared = prepare(ctx, training=True)
        outage = {}

        def outage_during_epoch_2():
            nonlocal server
            try:
                _wait_for(lambda: MlflowClient(uri).get_metric_history(run_id, "loss"), 300, "epoch 1 on the server")
                _kill(server)
                storage = _wait_for(
                    lambda: next((Path(cfg.cache_dir) / "ray_train").glob("finetune-*"), None),
                    60,
                    "the fine-tune's storage",
                )
                _wait_for(lambda: len(_checkpoints(storage)) >= 2, 300, "the epoch-2 checkpoint")
                outage["epochs_trained_while_down"] = len(_checkpoints(storage))
                server = _start_mlflow(tmp_path, port)
            except BaseException as exc:  # noqa: BLE001 - reported by the test's thread below
                outage["error"] = exc

        watcher = threading.Thread(target=outage_during_epoch_2)
        watcher.start()
        entry = finetune.finetune(ctx, prepared, run_id)
        watcher.join()
        assert "error" not in outage, outage
        history = read_history(entry.file_named(HISTORY_FILE))
        logged = MlflowClient(uri).get_metric_history(run_id, "loss")
    finally:
        _kill(server)
    assert outage["epochs_trained_while_down"] >= 2
    assert [m.step for m in logged] == [1, 2, 3]
    assert [m.value for m in logged] == [h["loss"] for h in history]
    assert [m.timestamp for m in logged] == [int(h["epoch_end_time"] * 1000) for h in history]


@pytest.mark.slow
def test_a_tracking_server_that_never_comes_back_is_one_line_and_a_rerun_completes_the_record(
    prepared, tmp_path, monkeypatch, capfd
):
    """The server dies during the run for good: after MLflow's retries (cut to one here, to keep the
    test short) `agft run` ends with one line and exit 1, the trained fine-tune is kept, and the same
    command against a server that answers again trains nothing and logs every epoch."""
    root, _, cfg = prepared
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    overrides = [*TINY, f"cache_dir={cfg.cache_dir}", "experiment=gone", "train.epochs=2", ONE_WORKER]  # last wins
    argv = ["run", "--tracking-uri", uri] + sets(overrides)
    server = _start_mlflow(tmp_path, port)
    # killed once training has checkpointed an epoch: the run's record and the fine-tune are under way (killed
    # as the run appears, the driver's next call may fail before training starts, and nothing is kept to check)
    killer = threading.Thread(
        target=lambda: (
            _wait_for(lambda: _experiment_runs(uri, "gone"), 300, "the run on the server"),
            _wait_for(
                lambda: [
                    c
                    for c in (Path(cfg.cache_dir) / "ray_train").glob("finetune-*/checkpoint_*")
                    if c.stat().st_mtime > started
                ],
                300,
                "the first checkpoint",
            ),
            _kill(server),
        )
    )
    started = time.time()
    killer.start()
    capfd.readouterr()
    code = main(argv)
    killer.join()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("agft:")]
    assert code == 1 and len(lines) == 1 and "run the same command again" in lines[0], lines
    finetunes = list((Path(cfg.cache_dir) / "finetune").glob("*/manifest.json"))
    server = _start_mlflow(tmp_path, port)
    try:
        assert main(argv) == 0
        runs = _experiment_runs(uri, "gone")
        finished = [r for r in runs if r.info.status == "FINISHED"]
        assert len(finished) == 1
        history = MlflowClient(uri).get_metric_history(finished[0].info.run_id, "loss")
        assert [m.step for m in history] == [1, 2]
    finally:
        _kill(server)
    assert list((Path(cfg.cache_dir) / "finetune").glob("*/manifest.json")) == finetunes  # nothing retrained


def _experiment_runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.slow
def test_two_runs_on_one_cache_dir_at_once_both_finish_with_one_whole_cache_each(tmp_path):
    """Two `agft run` of one config, started together on one cluster: they build the same teacher, text
    and fine-tune caches at the same time. Both finish with the same numbers; every cache ends with one
    manifest that passes its checks, and at most the two builds' attempts."""
    cmd, uri = agft_command(
        "run",
        tmp_path,
        TINY
        + [
            f"cache_dir={tmp_path / 'cache'}",
            "experiment=together",
            "model.weights=random",
            ONE_WORKER,
            "train.epochs=1",
        ],
    )
    with ray_cluster(head_cpus=2) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        logs = [(tmp_path / f"run{i}.log").open("w") for i in range(2)]
        runs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT) for log in logs]
        codes = [run.wait(timeout=900) for run in runs]
    assert codes == [0, 0], [(tmp_path / f"run{i}.log").read_text()[-3000:] for i in range(2)]
    manifests = sorted((tmp_path / "cache").glob("*/*/manifest.json"))
    assert {m.parent.parent.name for m in manifests} == {"teacher", "text", "finetune", "eval", "servable"}
    for manifest in manifests:
        content = json.loads(manifest.read_text())
        entry = CacheEntry(tmp_path / "cache", content["kind"], content["inputs"])
        assert entry.problem() is None, manifest
        assert 1 <= len(list(manifest.parent.glob("attempt-*"))) <= 2
    client = MlflowClient(uri)
    finished = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert [r.info.status for r in finished] == ["FINISHED", "FINISHED"]
    # MLflow's system metrics ("system/node0/...") are sampled on a clock: a run may end before its first sample
    accuracies = [
        {k: v for k, v in r.data.metrics.items() if "/" in k and not k.startswith("system/")} for r in finished
    ]
    assert accuracies[0] and accuracies[0] == accuracies[1]


@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_checkpoint_and_the_new_run_holds_every_epoch_once(tmp_path):
    """`agft run` is SIGKILLed after its first epoch's checkpoint, on a cluster of its own; the same
    command again resumes training from that checkpoint (epoch 1 is not trained twice) and its MLflow
    run carries the whole history, each epoch once. The killed run is left as the killed driver left it."""
    epochs = 5  # room for the epochs a dead driver's workers still train before Ray reaps them (2 s and more here)
    overrides = [f"cache_dir={tmp_path / 'cache'}", "experiment=driver-kill", f"train.epochs={epochs}", ONE_WORKER]
    cmd, uri = agft_command("run", tmp_path, TINY + overrides)
    with ray_cluster(head_cpus=2) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            # rank 0 logs an epoch to MLflow, then reports its checkpoint: the kill lands as soon as the checkpoint
            # is there (a look at MLflow first made the kill late enough, once, for the killed run to end)
            _wait_for(lambda: _checkpointed(tmp_path / "cache"), 400, "epoch 1's checkpoint")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log = tmp_path / "resumed.log"
        with log.open("w") as out:
            code = subprocess.run(
                cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=600
            ).returncode
    assert code == 0, log.read_text()[-4000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("driver-kill").experiment_id
    killed, resumed = sorted(client.search_runs([experiment]), key=lambda r: r.info.start_time)
    assert resumed.info.status == "FINISHED"
    # the killed driver's workers may end an epoch or two more before Ray reaps them; the run must be cut short
    killed_history = client.get_metric_history(killed.info.run_id, "loss")
    killed_steps = [m.step for m in killed_history]
    assert killed_steps == list(range(1, len(killed_steps) + 1)) and 1 <= len(killed_steps) < epochs, killed_steps
    history = client.get_metric_history(resumed.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    assert history[0].timestamp == killed_history[0].timestamp  # epoch 1 came from the checkpoint
