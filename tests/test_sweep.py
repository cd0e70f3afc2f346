"""`agft sweep` on tiny sizes: real local Ray Tune over Ray Train, real MLflow store."""

import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.util.state import list_tasks
from ray_cluster import agft_command, ray_cluster
from safetensors.torch import load_file
from tiny import ONE_ZERO_SHOT, TEACHER, prepared_by_hand

from pipeline.checkpoints import newest_checkpoint
from pipeline.cli import main
from pipeline.config.checks import check_sweep
from pipeline.config.loading import load_config
from pipeline.config.sections import ConfigError
from pipeline.sweep import best_trial, sweep

# The search as shipped (random search, ASHA, as many trials at once as the cluster holds trainers), on tiny
# sizes: trainers of one worker, so that two trials run at once on the 2-CPU test cluster.
TINY = [
    *TEACHER,
    "data.train.limit=128",
    ONE_ZERO_SHOT,
    "train.epochs=2",
    "train.batch_size=32",
    "train.num_workers=1",
    "train.validation.dataset.limit=32",
    "sweep.space={calibration.gamma: {choice: [0.3, 0.6, 0.9]}, calibration.inv_tau: {loguniform: [15, 40]}}",
    "sweep.num_samples=1",
    "calibration.gamma=auto",  # fitted once for the sweep; the γ axis overrides it in every trial
]
SWEEP_DEADLINE_S = 420  # a stalled sweep (issue 16) fails here instead of hanging the suite


@contextmanager
def deadline(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"sweep still running after {seconds} s: stalled")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _task_count(name: str) -> int:
    # the address named: with tests in parallel, "any running local Ray" may be another test process's
    tasks = list_tasks(
        address=ray.get_runtime_context().gcs_address, filters=[("func_or_class_name", "=", name)], limit=10000
    )
    return sum(1 for t in tasks if t.state == "FINISHED")


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(None, TINY + [f"cache_dir={root / 'cache'}", "experiment=sweep-test"])
    assert cfg.sweep.scheduler == "asha" and cfg.sweep.search == "random" and cfg.sweep.max_concurrent_trials == "auto"
    before = {n: _task_count(n) for n in ("pretrain_teacher", "teacher_shard", "embed_class_prompts")}
    lines = []
    with deadline(SWEEP_DEADLINE_S):
        result = sweep(cfg, uri, root / "best.yaml", log=lines.append)
    assert "[sweep] up to 2 trials at once: the cluster's room for trainers of 1 worker" in lines
    time.sleep(2)  # the state API lags task completion by a moment
    after = {n: _task_count(n) for n in before}
    return cfg, uri, result, {n: after[n] - before[n] for n in before}


@pytest.mark.slow
def test_sweep_builds_each_cache_exactly_once(swept):
    cfg, _, result, built = swept
    assert len(result.trials) == 3
    assert built == {"pretrain_teacher": 1, "teacher_shard": cfg.teacher_cache_shards, "embed_class_prompts": 2}
    assert not any(result.cache_hits.values())


def test_sweep_logs_nested_runs_and_summary(swept):
    cfg, uri, result, _ = swept
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 3 and not any(t["error"] for t in result.trials)
    assert {c.data.tags["trial_id"] for c in children} == {t["trial_id"] for t in result.trials}
    epochs = {t["trial_id"]: t["epochs"] for t in result.trials}
    for child in children:  # every trial ended: trained to the end, or stopped early by ASHA
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_robust_acc")]
        assert steps == list(range(1, epochs[child.data.tags["trial_id"]] + 1))
        assert child.info.status == ("FINISHED" if steps == [1, 2] else "KILLED")
    assert any(c.info.status == "FINISHED" for c in children)
    assert sorted(float(c.data.params["calibration.gamma"]) for c in children) == [0.3, 0.6, 0.9]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {
        "trials.csv",
        "trials.md",
        "best_params.json",
        "best.yaml",
        "frontier.png",
        "robust_vs_calibration.gamma.png",
        "robust_vs_calibration.inv_tau.png",
        "calibration.json",
        "calibration.png",
    } <= artifacts
    assert 0 < client.get_run(result.parent_run_id).data.metrics["calibration_gamma"] <= 1


def test_best_config_is_valid_and_is_the_best_trial(swept):
    cfg, _, result, _ = swept
    best_cfg = load_config(result.best_config_path)
    best_row = max(result.trials, key=lambda t: t["val_robust_acc"])
    assert best_cfg.calibration.gamma == best_row["calibration.gamma"]
    assert best_cfg.calibration.inv_tau == pytest.approx(best_row["calibration.inv_tau"])
    assert best_cfg.train == cfg.train and best_cfg.data == cfg.data
    assert 15 <= best_cfg.calibration.inv_tau <= 40


def test_best_trials_model_is_registered_from_the_parent_run(swept, tmp_path):
    cfg, uri, result, _ = swept
    client = MlflowClient(uri)
    best_row = max(result.trials, key=lambda t: t["val_robust_acc"])
    (version,) = client.search_model_versions("name = 'sweep-test'")
    assert client.get_run(result.parent_run_id).data.tags["best_model"] == f"models:/sweep-test/{version.version}"
    assert version.run_id == result.parent_run_id and version.tags["role"] == "fine-tuned"
    assert version.tags["sweep_trial"] == best_row["trial_id"]
    assert float(version.tags["val_robust_acc"]) == pytest.approx(best_row["val_robust_acc"], abs=5e-5)
    assert float(version.tags["sweep.calibration.gamma"]) == best_row["calibration.gamma"]
    # it serves the image tower of the trial's last checkpoint, the one its metrics come from
    checkpoint = newest_checkpoint(str(Path(cfg.cache_dir) / "ray_tune" / f"trial-{best_row['trial_id']}"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        served = load_file(
            mlflow.artifacts.download_artifacts(
                f"models:/sweep-test/{version.version}/artifacts/clip.safetensors", dst_path=str(tmp_path)
            )
        )
    tuned = load_file(f"{checkpoint}/image_encoder.safetensors")
    assert all(torch.equal(served[name], tensor) for name, tensor in tuned.items())


def _tiny(cfg, *overrides: str):
    """TINY on cfg's cache (warm from the fixture), with overrides."""
    return load_config(None, [*TINY, f"cache_dir={cfg.cache_dir}", *overrides])


def test_a_trial_that_cannot_be_placed_fails_and_the_sweep_goes_on(swept, tmp_path, capsys):
    """3 workers of 1 CPU on a 2-CPU cluster without an autoscaler can never start: that trial ends
    FAILED at once with the reason, and the next trial still runs (caches warm from the fixture)."""
    cfg, uri, _, _ = swept
    lines = []
    cfg = _tiny(cfg, "experiment=sweep-placement", "sweep.space={train.num_workers: {grid: [3, 1]}}")
    with deadline(SWEEP_DEADLINE_S):
        result = sweep(cfg, uri, tmp_path / "best.yaml", log=lines.append)
    assert [(t["train.num_workers"], t["error"]) for t in result.trials] == [(3, True), (1, False)]
    assert result.best_params == {"train.num_workers": 1}
    (failed,) = [line for line in capsys.readouterr().out.splitlines() if " failed" in line]  # not "failed: None"
    assert re.fullmatch(r"\[sweep\] trial \w+ failed \(its error: /\S+/error\.txt\); the sweep goes on", failed)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-placement").experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    status = {c.data.params["train.num_workers"]: c.info.status for c in children}
    assert status == {"3": "FAILED", "1": "FINISHED"}


def test_a_sweep_whose_trials_all_fail_ends_with_one_line_and_closed_runs(swept, tmp_path, capsys):
    cfg, uri, _, _ = swept
    args = ["sweep", "--tracking-uri", uri, "--best-out", str(tmp_path / "best.yaml")]
    for o in TINY + [
        f"cache_dir={cfg.cache_dir}",
        "experiment=sweep-all-fail",
        "sweep.space={train.num_workers: {grid: [3]}}",
    ]:
        args += ["--set", o]
    capsys.readouterr()
    with deadline(SWEEP_DEADLINE_S):
        assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("agft:")]
    assert len(err) == 1 and "none of the 1 trials" in err[0] and "train.num_workers=3 workers" in err[0]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-all-fail").experiment_id
    assert {r.info.status for r in client.search_runs([experiment])} == {"FAILED"}
    assert not (tmp_path / "best.yaml").exists()


@pytest.mark.slow
def test_asha_stops_a_worse_trial_early_and_its_run_ends_killed(swept, tmp_path):
    """Two trials one after the other, on the training loss: the second learns at a negligible rate,
    so its first-epoch loss is above the first trial's and ASHA (grace period 1, reduction 2) stops it
    there, though the sweep as configured (train.epochs swept up to 3) would train it for 3 epochs."""
    cfg, uri, _, _ = swept
    lines = []
    cfg = _tiny(
        cfg,
        "experiment=sweep-asha",
        "sweep.max_concurrent_trials=1",
        "train.warmup_epochs=0",
        "sweep.space={train.lr: {grid: [0.01, 1.0e-9]}, train.epochs: {choice: [3]}}",
        "sweep.metric=loss",
        "sweep.mode=min",
    )
    assert cfg.max_epochs() == 3 and cfg.train.epochs == 2
    with deadline(SWEEP_DEADLINE_S):
        result = sweep(cfg, uri, tmp_path / "best.yaml", log=lines.append)
    assert [(t["train.lr"], t["epochs"]) for t in result.trials] == [(0.01, 3), (1.0e-9, 1)]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-asha").experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert {c.data.params["train.lr"]: c.info.status for c in children} == {"0.01": "FINISHED", "1e-09": "KILLED"}
    # what the stopped trial reported is in its run: logged before Tune could see it and stop the trial
    (stopped,) = [c for c in children if c.info.status == "KILLED"]
    (reported,) = [t for t in result.trials if t["train.lr"] == 1.0e-9]
    assert [(m.step, m.value) for m in client.get_metric_history(stopped.info.run_id, "loss")] == [
        (1, pytest.approx(reported["loss"]))
    ]


@pytest.mark.parametrize(
    "space, needle",
    [
        ("{calibration.gamm: {choice: [0.3]}}", "sweep.space.calibration.gamm"),
        ("{data.train.limit: {choice: [32, 64]}}", "sweep.space.data.train.limit: every trial trains"),
        ("{calibration.gamma: {choice: []}}", "choice"),
        ("{train.lr: {uniform: [0.1, 0.01]}}", "low > high"),
        ("{calibration.gamma: {uniform: [0.5, 1.5]}}", "calibration.gamma"),
    ],
)
def test_bad_search_space_is_one_clear_error_before_any_trial(tmp_path, monkeypatch, capsys, space, needle):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--set", f"sweep.space={space}", "--set", f"cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert list(tmp_path.iterdir()) == []


def _result(metric: float, epoch: int, error: Exception | None = None, trial: str = "t0", **config) -> tune.Result:
    metrics = {"val_robust_acc": metric, "epoch": epoch, "trial_id": trial, "config": config}
    return tune.Result(metrics, None, error, "/unused")


def test_the_pick_is_a_trial_that_trained_every_epoch_without_an_error():
    """Not a trial that failed after a good epoch (its config does not train to the end), nor one ASHA stopped at
    epoch 1 (measured earlier in its training than the finished ones); among every error-free trial if none
    finished."""
    spec = load_config(None, []).sweep
    finished = _result(0.40, 3, **{"calibration.gamma": 0.3})
    failed = _result(0.90, 2, RuntimeError("out of memory"), **{"calibration.gamma": 0.6})
    stopped = _result(0.55, 1, **{"calibration.gamma": 0.9})
    assert best_trial([failed, stopped, finished], spec, max_epochs=3) is finished
    assert best_trial([failed, stopped], spec, max_epochs=3) is stopped
    # a trial whose search set its own train.epochs finished at that epoch
    short = _result(0.50, 2, **{"train.epochs": 2})
    assert best_trial([finished, short], spec, max_epochs=3) is short
    assert best_trial([failed], spec, max_epochs=3) is None
    # a tie goes to the same trial whatever the order Tune lists them in: a resumed sweep would register the other
    tied = _result(0.40, 3, trial="t1", **{"calibration.gamma": 0.6})
    assert best_trial([tied, finished], spec, max_epochs=3) is finished
    assert best_trial([finished, tied], spec, max_epochs=3) is finished


def test_the_sweep_mode_is_the_one_its_metric_improves_in():
    assert load_config(None, ["sweep.metric=loss"]).sweep.mode == "min"
    assert load_config(None, []).sweep.mode == "max"
    with pytest.raises(ConfigError, match="sweep.*mode max would pick the worst trial by loss"):
        load_config(None, ["sweep.metric=loss", "sweep.mode=max"])


def test_sweep_needs_a_space_and_a_validation_set():
    with pytest.raises(ConfigError, match="sweep.space"):
        check_sweep(load_config(None, ["sweep.space={}"]))
    with pytest.raises(ConfigError, match="train.validation"):
        check_sweep(load_config(None, ["train.validation=null"]))


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """The driver is SIGKILLed on a cluster of its own once a trial has finished; a new driver on the same
    cluster resumes the sweep (a killed local Ray would outlive its driver and confuse the next one)."""
    cmd, uri = agft_command(
        "sweep",
        tmp_path,
        TINY
        + [
            f"cache_dir={tmp_path / 'cache'}",
            "experiment=resume-test",
            "sweep.max_concurrent_trials=1",  # the first trial ends before the second starts
            "sweep.space={calibration.gamma: {grid: [0.3, 0.6]}}",
        ],
        "--best-out",
        str(tmp_path / "best.yaml"),
    )
    with ray_cluster(head_cpus=2) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 240
        finished = []
        try:
            while time.time() < deadline and not finished and proc.poll() is None:
                time.sleep(1)
                finished = _finished_trials(uri)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert len(finished) == 1, "the first trial should finish before the sweep is killed"
        first_trial, first_run = finished[0]
        log = tmp_path / "resumed.log"
        with log.open("w") as out:
            try:
                code = subprocess.run(
                    cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=400
                ).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        assert code == 0, log.read_text()[-4000:]
        # the finished sweep once more: it resumes, finds every trial done and registers nothing new
        again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'resume-test'")) == 1
    runs = _finished_trials(uri)
    assert len(runs) == 2 and len({t for t, _ in runs}) == 2
    history = client.get_metric_history(first_run, "loss")
    assert [m.step for m in history] == [1, 2]  # logged once: the finished trial did not train again
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["calibration"]["gamma"] in (0.3, 0.6)


def _finished_trials(uri: str) -> list[tuple[str, str]]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume-test")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "tags.trial_id != '' and attributes.status = 'FINISHED'")
    return [(r.data.tags["trial_id"], r.info.run_id) for r in runs]


def test_a_sweep_is_named_by_what_it_trains_not_by_what_it_only_logs():
    from pipeline.sweep import sweep_name

    name = sweep_name(load_config(None, TINY))
    assert sweep_name(load_config(None, [*TINY, "verbose=true", "system_metrics_interval=null"])) == name
    assert sweep_name(load_config(None, [*TINY, "train.lr=0.01"])) != name
    assert sweep_name(load_config(None, [*TINY, "sweep.num_samples=2"])) != name


def test_a_sweep_resumes_only_on_the_weights_and_images_it_trained_on():
    """The same config over a weights file or a dataset changed in place: its finished trials trained on the old
    ones, so the sweep starts anew in a directory of its own instead of restoring them."""
    from pipeline.sweep import sweep_directory, sweep_name

    cfg = load_config(None, [*TINY, "data.train.limit=64"])
    directory = sweep_directory(cfg, prepared_by_hand(cfg))
    assert directory.startswith(sweep_name(cfg)) and directory == sweep_directory(cfg, prepared_by_hand(cfg))
    assert sweep_directory(cfg, prepared_by_hand(cfg, digest="other weights")) != directory
    other_images = prepared_by_hand(load_config(None, [*TINY, "data.train.limit=32"]))
    assert sweep_directory(cfg, other_images) != directory


def test_search_space_maps_every_domain_and_optuna_is_available():
    from ray import tune

    from pipeline.sweep import _search_algorithm, search_space

    cfg = load_config(
        None,
        [
            "sweep.space={calibration.gamma: {choice: [0.2, 0.4]}, train.lr: {grid: [0.1, 0.2]},"
            " calibration.inv_tau: {loguniform: [10, 100]}, train.momentum: {uniform: [0.5, 0.9]}}"
        ],
    )
    space = search_space(cfg.sweep)
    assert space["train.lr"] == tune.grid_search([0.1, 0.2])
    assert space["calibration.gamma"] == tune.grid_search([0.2, 0.4])  # each value once, not drawn with repeats
    optuna_space = search_space(
        load_config(None, ["sweep.search=optuna", "sweep.space={calibration.gamma: {choice: [0.2, 0.4]}}"]).sweep
    )
    assert isinstance(optuna_space["calibration.gamma"], tune.search.sample.Categorical)
    assert (space["calibration.inv_tau"].lower, space["calibration.inv_tau"].upper) == (10, 100)
    assert isinstance(space["calibration.inv_tau"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(space["train.momentum"].get_sampler(), tune.search.sample.Uniform)
    assert _search_algorithm(cfg.sweep) is None
    optuna_cfg = load_config(None, ["sweep.search=optuna"])
    assert type(_search_algorithm(optuna_cfg.sweep)).__name__ == "OptunaSearch"
    with pytest.raises(ConfigError, match="optuna"):
        load_config(None, ["sweep.search=optuna", "sweep.space={train.lr: {grid: [0.1]}}"])


def test_the_best_so_far_line_goes_by_each_trials_last_epoch_and_counts_restored_trials(tmp_path, capsys):
    """Trial a's last epoch beats trial b's, though b had the best single epoch: the sweep keeps a trial's last
    epoch, so the line names a. Then trial r, ended before the sweep was resumed (restored, never completed in this
    driver), beats both. Tune's own Trial objects carry the results, through the callback's hooks."""
    from ray.tune.experiment import Trial

    from pipeline import tracking
    from pipeline.sweep import _Progress

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [*TINY, "experiment=best-line", "sweep.metric=val_robust_acc", "sweep.mode=max"])
    parent = tracking.start_run(uri, cfg.experiment, {}, {})
    progress = _Progress(cfg, uri, parent)
    trials = []

    def trial(trial_id: str, epochs: list[float]) -> Trial:
        made = Trial("trainable", config={"train.epochs": 2}, trial_id=trial_id, stub=True)
        tracking.trial_run(uri, cfg.experiment, parent, trial_id, {}, {})
        trials.append(made)
        for epoch, value in enumerate(epochs, start=1):
            result = {"epoch": epoch, "loss": 1.0, "val_robust_acc": value}
            progress.on_trial_result(0, trials, made, result)
            made.update_last_result(result)
        return made

    for trial_id, epochs in (("a", [0.30, 0.35]), ("b", [0.36, 0.34])):
        progress.on_trial_complete(0, trials, ended := trial(trial_id, epochs))
        ended.set_status(Trial.TERMINATED)  # as Tune marks it once its callbacks return
    assert capsys.readouterr().out.splitlines()[-1].endswith("best so far: a val_robust_acc=0.3500")

    trial("r", [0.38, 0.40]).set_status(Trial.TERMINATED)
    progress.on_trial_complete(0, trials, trial("c", [0.20, 0.25]))
    assert capsys.readouterr().out.splitlines()[-1].endswith("best so far: r val_robust_acc=0.4000")
