"""`agft sweep`: Ray Tune over Ray Train. The caches are built once; every trial reads them.

Each trial is a function that builds a TorchTrainer reporting to Tune through
TuneReportCallback (Ray 2.60's pattern for Train inside Tune), logs into its own nested
MLflow run, and is scheduled by ASHA on the per-epoch validation metric.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from agft_core.cache import exists, filesystem, fingerprint, join, read_bytes, write_bytes
from agft_core.calibration import Calibration
from agft_core.catalog import is_uri
from pipeline import report, tracking
from pipeline.checkpoints import ENCODER_FILE
from pipeline.cluster import check_resources, trainer_room
from pipeline.config.loading import dump_yaml
from pipeline.config.schema import Config, SweepConfig, with_overrides
from pipeline.context import Prepared, RunContext
from pipeline.run import prepare
from pipeline.stages import calibrate, describe, finetune, publish
from pipeline.stages.calibrate import resolved
from pipeline.train import EPOCH_METRICS, TrainInputs
from pipeline.trainer import fit

PARENT_RUN_FILE = "mlflow_parent_run_id"
TRIAL_DRIVER_MEMORY = 256 * 1024**2


class SweepFailed(RuntimeError):
    """No trial produced the sweep metric: one line saying why."""


def search_space(sweep: SweepConfig) -> dict:
    """Tune's domains. Under random search a finite list is a grid, each value tried once: drawn at random
    (tune.choice), 4 trials over 4 values repeat one with a chance of 9 in 10."""
    space = {}
    for key, domain in sweep.space.items():
        if domain.choice is not None:
            space[key] = tune.choice(domain.choice) if sweep.search == "optuna" else tune.grid_search(domain.choice)
        elif domain.grid is not None:
            space[key] = tune.grid_search(domain.grid)
        elif domain.uniform is not None:
            space[key] = tune.uniform(*domain.uniform)
        else:
            space[key] = tune.loguniform(*domain.loguniform)
    return space


def _search_algorithm(sweep: SweepConfig):
    if sweep.search != "optuna":
        return None  # Tune's default: random sampling, with grid_search axes expanded
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=0)


def _scheduler(sweep: SweepConfig, max_epochs: int):
    if sweep.scheduler == "fifo":
        return None
    return tune.schedulers.ASHAScheduler(
        time_attr="epoch", max_t=max_epochs, grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor
    )


def run_trial(params: dict, *, inputs: TrainInputs, parent_run_id: str, storage: str, datasets: list[dict]) -> None:
    """One trial: a full Ray Train fine-tune of the base config with `params` applied."""
    cfg = resolved(with_overrides(inputs.cfg, params), inputs.calibration)  # γ: auto at this trial's 1/τ
    trial_id = tune.get_context().get_trial_id()
    run_id = tracking.trial_run(
        inputs.tracking_uri,
        cfg.experiment,
        parent_run_id,
        trial_id,
        cfg.run_params(),
        {f"sweep.{k}": str(v) for k, v in params.items()},
    )
    tracking.log_datasets(inputs.tracking_uri, run_id, datasets)
    # The run's end status is the driver's to set (_Progress): Tune may stop this trial by killing its
    # actor, which can surface here as an error after the trial has ended well.
    check_resources(cfg, trainer=True, tasks=False)  # a trial's own trainer: the CLI checked the base config's
    fit(
        replace(inputs, cfg=cfg, run_id=run_id, log_epochs=False),
        storage,
        f"trial-{trial_id}",
        callbacks=[TuneReportCallback()],
    )


class _Progress(tune.Callback):
    """One line per trial event and the best trial so far; closes each trial's MLflow run as Tune ends
    the trial: ASHA stops a trial (also at max_t) by killing its actor, which cannot close its own."""

    def __init__(self, cfg: Config, uri: str, parent_run_id: str):
        self.metric, self.sign, self.max_epochs = (
            cfg.sweep.metric,
            1 if cfg.sweep.mode == "max" else -1,
            cfg.max_epochs(),
        )
        self.uri, self.experiment, self.parent_run_id = uri, cfg.experiment, parent_run_id

    @staticmethod
    def log(line: str) -> None:  # not a stored callable: the Tuner pickles its callbacks
        print(line, flush=True)

    def _close(self, trial, status: str) -> None:
        run_id = tracking.find_trial_run(self.uri, self.experiment, self.parent_run_id, trial.trial_id)
        if run_id:  # a trial that failed before it started has none
            tracking.finish_run(self.uri, run_id, status)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.log(f"[sweep] trial {trial.trial_id} running {trial.config}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """Logs the epoch to the trial's run. Tune calls this for every result it receives, before it acts on
        the scheduler's decision: a trial ASHA stops keeps what it reported (the trial itself logs nothing)."""
        run_id = tracking.find_trial_run(self.uri, self.experiment, self.parent_run_id, trial.trial_id)
        tracking.log_history(self.uri, run_id, [{k: result[k] for k in ("epoch", *EPOCH_METRICS) if k in result}])

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = (trial.last_result or {}).get("epoch") or 0
        done = trained_every_epoch(trial.last_result or {}, trial.config, self.max_epochs)
        self._close(trial, "FINISHED" if done else "KILLED")
        self.log(
            f"[sweep] trial {trial.trial_id} {'done' if done else 'stopped early by ASHA'} after {epochs} "
            f"epochs; {self._best_so_far(trials, trial)}"
        )

    def _best_so_far(self, trials, completed) -> str:
        """Over every ended trial, those a resumed sweep restored included, by its last epoch and among those that
        trained every epoch where any did, as the sweep picks its best (best_trial)."""
        ended = [
            t
            for t in trials
            if (t is completed or t.status == Trial.TERMINATED) and has_score(t.last_result, self.metric)
        ]
        finished = [t for t in ended if trained_every_epoch(t.last_result, t.config, self.max_epochs)]
        if not ended:
            return ""
        value, trial_id = max(
            ((t.last_result[self.metric], t.trial_id) for t in sorted(finished or ended, key=lambda t: t.trial_id)),
            key=lambda s: self.sign * s[0],
        )
        return f"best so far: {trial_id} {self.metric}={value:.4f}"

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")
        # Tune writes the trial's error file once the trial has stopped, after this callback: say where it will be.
        # Not trial.get_error(): for a trial a resumed sweep retried, it reads the error of the attempt before.
        self.log(f"[sweep] trial {trial.trial_id} failed (its error: {trial.path}/error.txt); the sweep goes on")


def _last_line(error: BaseException | None) -> str:
    """The exception line of a trial's error (Ray wraps it in the remote traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


@dataclass
class SweepResult:
    parent_run_id: str
    trials: list[dict]
    best_params: dict
    best_config_path: Path
    cache_hits: dict[str, bool]
    seconds: dict[str, float]


def sweep_name(cfg: Config) -> str:
    """The sweep's name and Tune directory: a run of the same config resumes it. What the sweep only logs (console
    verbosity, system metrics' sampling) is left out: changing it resumes the same sweep."""
    return f"sweep-{fingerprint(cfg.model_dump(mode='json', exclude={'verbose', 'system_metrics_interval'}))}"


def sweep_directory(cfg: Config, prepared: Prepared) -> str:
    """The sweep's Tune directory: its name, and what its trials train on, the teacher's weights and the training and
    validation images. The same config resumes its sweep only on the same inputs; a weights file or a dataset
    changed in place starts a new sweep beside the old one, which stays as it was."""
    trained_on = {"weights": prepared.teacher.digest} | {
        key: prepared.infos[key].identity for key in ("train", "val") if key in prepared.infos
    }
    return f"{sweep_name(cfg)}-{fingerprint(trained_on)[:8]}"


def sweep(cfg: Config, tracking_uri: str, best_out: Path, log=print) -> SweepResult:
    spec = cfg.sweep
    ctx = RunContext(cfg, tracking_uri, log=log)
    # -- the caches, built once for every trial
    clock = time.perf_counter()
    prepared = prepare(ctx, training=True)
    inputs = finetune.inputs(ctx, prepared, run_id="")
    seconds = {"caches": time.perf_counter() - clock}
    # -- the parent run: new, or the one a resumed sweep started
    storage = ctx.storage("ray_tune")
    name, directory = sweep_name(cfg), sweep_directory(cfg, prepared)
    sweep_dir = join(storage, directory)
    parent_file = join(sweep_dir, PARENT_RUN_FILE)
    resumed = tune.Tuner.can_restore(sweep_dir) and exists(parent_file)
    # A sweep reads the training and validation sets; it evaluates no zero-shot set
    datasets = [d for d in describe.dataset_inputs(prepared) if d["context"] != "evaluation"]
    if resumed:
        parent_run_id = read_bytes(parent_file).decode().strip()
        log(f"[sweep] resuming {sweep_dir} (finished trials are kept)")
    else:
        tags = {"mlflow.runName": name, "sweep": "parent"}
        parent_run_id = tracking.start_run(tracking_uri, cfg.experiment, cfg.run_params(), tags, cfg.artifact_location)
        calibrate.log(ctx, parent_run_id, prepared.calibration)
        tracking.log_datasets(tracking_uri, parent_run_id, datasets)
    # -- the trials
    trainable = tune.with_parameters(
        run_trial, inputs=inputs, parent_run_id=parent_run_id, storage=storage, datasets=datasets
    )
    # The trial driver only waits on its trainer, whose workers hold the CPUs/GPUs; Ray refuses an
    # empty request, so the driver asks for the memory it actually uses.
    trainable = tune.with_resources(trainable, {"memory": TRIAL_DRIVER_MEMORY})
    if resumed:
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_errored=True)
    else:
        tuner = _tuner(ctx, trainable, directory, storage, parent_run_id)
    fs, path = filesystem(sweep_dir)
    fs.create_dir(path, recursive=True)
    write_bytes(parent_file, parent_run_id.encode())
    clock = time.perf_counter()
    grid = tuner.fit()
    seconds["trials"] = time.perf_counter() - clock
    # -- the best trial: its config, its model, the report
    clock = time.perf_counter()
    trials = [_trial_row(r, cfg, prepared.calibration, spec.metric) for r in grid]
    best = best_trial(list(grid), spec, cfg.max_epochs())
    if best is None:
        tracking.finish_run(tracking_uri, parent_run_id, "FAILED")
        first_error = next((r.error for r in grid if r.error), None)
        raise SweepFailed(
            f"sweep: none of the {len(trials)} trials reported {spec.metric}; the first error: "
            f"{_last_line(first_error)}"
        )
    best_out.write_text(dump_yaml(with_overrides(cfg, best.config)))
    if cfg.register_models:
        _register_best(ctx, prepared, parent_run_id, storage, best)
    _report(ctx, parent_run_id, trials, best, best_out)
    seconds["report"] = time.perf_counter() - clock
    return SweepResult(
        parent_run_id, trials, dict(best.config), best_out, ctx.hits, {k: round(v, 2) for k, v in seconds.items()}
    )


def trained_every_epoch(metrics: dict, trial_config: dict, max_epochs: int) -> bool:
    """Whether a trial reported its last epoch (its own train.epochs where the search sets it): the last value of
    a trial ASHA stopped is from an earlier epoch than a finished trial's."""
    return (metrics.get("epoch") or 0) >= trial_config.get("train.epochs", max_epochs)


def has_score(metrics: dict | None, metric: str) -> bool:
    """Whether a trial's reported metrics hold a finite value of `metric` to rank it by."""
    return isinstance(value := (metrics or {}).get(metric), float | int) and math.isfinite(value)


def best_trial(results: list[tune.Result], spec: SweepConfig, max_epochs: int) -> tune.Result | None:
    """The sweep's pick: the best spec.metric at the last epoch among the trials that trained every epoch without
    an error (a trial that failed after a good epoch has no model of its config to give; one ASHA stopped is
    measured earlier in its training than the others), or among every trial without an error if none did. A tie
    goes to the first trial by id, whatever the order Tune lists them in."""
    scored = sorted(
        (r for r in results if not r.error and has_score(r.metrics, spec.metric)),
        key=lambda r: r.metrics.get("trial_id", ""),
    )
    finished = [r for r in scored if trained_every_epoch(r.metrics, r.config, max_epochs)]
    sign = 1 if spec.mode == "max" else -1
    return max(finished or scored, key=lambda r: sign * r.metrics[spec.metric], default=None)


def _tuner(ctx: RunContext, trainable, name: str, storage: str, parent_run_id: str) -> tune.Tuner:
    cfg, spec = ctx.cfg, ctx.cfg.sweep
    concurrent = spec.max_concurrent_trials
    if concurrent == "auto":
        concurrent = trainer_room(cfg)
        ctx.log(
            f"[sweep] up to {concurrent} trial{'s' * (concurrent > 1)} at once: the cluster's room for trainers "
            f"of {cfg.train.num_workers} worker{'s' * (cfg.train.num_workers > 1)}"
        )
    return tune.Tuner(
        trainable,
        param_space=search_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            max_concurrent_trials=concurrent,
            # Never reuse a trial's actor. The trial's Train run ends after
            # Tune has marked the trial done (ASHA stops it at max_t, or early),
            # so reuse fails and stalls Tune (issue 16), and a reused actor
            # keeps an early-stopped trainer alive. A killed actor takes its
            # Train controller and workers with it.
            reuse_actors=False,
            search_alg=_search_algorithm(spec),
            scheduler=_scheduler(spec, cfg.max_epochs()),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=1 if cfg.verbose else 0,
            callbacks=[_Progress(cfg, ctx.tracking_uri, parent_run_id)],
        ),
    )


def _trial_row(result, cfg: Config, calibration: Calibration | None, metric: str) -> dict:
    m = result.metrics or {}
    trial_cfg = resolved(with_overrides(cfg, result.config), calibration)
    return {
        "trial_id": m.get("trial_id"),
        **result.config,
        "calibration.gamma": trial_cfg.calibration.gamma,
        "calibration.inv_tau": trial_cfg.calibration.inv_tau,
        "epochs": m.get("epoch"),
        "val_clean_acc": m.get("val_clean_acc"),
        "val_robust_acc": m.get("val_robust_acc"),
        metric: m.get(metric),
        "error": bool(result.error),
    }


def _register_best(ctx: RunContext, prepared: Prepared, parent_run_id: str, storage: str, best) -> None:
    """The best trial's fine-tuned CLIP (the checkpoint of the epoch its metrics are from), logged to the sweep's
    parent run and registered, tagged with its trial, its values and its validation accuracy; the parent run is
    tagged with the version. A resumed sweep registers nothing new when its best is the one registered (the registry
    finds its weights), and registers and tags a trial that wins on resuming (an errored trial retried)."""
    uri, metrics, trial_id = ctx.tracking_uri, best.metrics, best.metrics["trial_id"]
    if not metrics.get(CHECKPOINT_PATH_KEY):
        raise SweepFailed(f"sweep: the best trial {trial_id} reported no checkpoint to register")
    # Ray reports the path inside its filesystem, without the storage's scheme
    checkpoint = (
        f"{storage.split('://', 1)[0]}://{metrics[CHECKPOINT_PATH_KEY]}"
        if is_uri(storage)
        else metrics[CHECKPOINT_PATH_KEY]
    )
    tags = {
        "sweep_trial": trial_id,
        **{f"sweep.{k}": str(v) for k, v in best.config.items()},
        **{k: f"{metrics[k]:.4f}" for k in ("val_clean_acc", "val_robust_acc") if metrics.get(k) is not None},
    }
    version = publish.register_model(ctx, prepared, parent_run_id, join(checkpoint, ENCODER_FILE), tags)
    name = ctx.cfg.experiment
    tracking.tag_run(uri, parent_run_id, {"best_model": f"models:/{name}/{version.version}"})
    ctx.log(f"[registry] {name}: version {version.version} (the best trial, {trial_id})")


def _report(ctx: RunContext, parent_run_id: str, trials: list[dict], best, best_out: Path) -> None:
    """The trials' table and plots and the best trial's values, to the parent run, which ends here."""
    uri, axes = ctx.tracking_uri, sorted({"calibration.gamma", "calibration.inv_tau", *ctx.cfg.sweep.space})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        report.write_csv(trials, out / "trials.csv")
        (out / "trials.md").write_text(report.table(trials))
        report.plot_sweep(trials, axes, out, best.metrics["trial_id"])
        (out / "best_params.json").write_text(json.dumps(dict(best.config), indent=2))
        files = [out / "trials.csv", out / "trials.md", out / "best_params.json", best_out, *sorted(out.glob("*.png"))]
        tracking.log_results(uri, parent_run_id, {}, files)
    tracking.finish_run(uri, parent_run_id)
