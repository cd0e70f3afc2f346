"""The AGFT DAG on Ray Core, wired from its stages (pipeline/stages/, docs/architecture.md):

    describe ─▶ pretrain* ─▶ caches (text ∥ teacher) ─▶ calibrate* ─▶ finetune ─▶ evaluate ─▶ publish
                                                                   └─ evaluate (original teacher, beside it)

`agft run` is run(), `agft eval` is run_eval(); `agft sweep` and `agft compare` reuse prepare() and the
stages. Stages run in dependency order; the Ray tasks inside a stage run in parallel. Every stage whose output
is content-addressed checks its cache first, says whether it hit, and rebuilds anything stale or corrupt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray

from agft_core.catalog import METHOD_SPECS, attack_key
from pipeline import report, tracking
from pipeline.checkpoints import ENCODER_FILE
from pipeline.config.checks import preflight
from pipeline.config.schema import Config
from pipeline.context import Prepared, RunContext
from pipeline.remote import get
from pipeline.stages import caches, calibrate, describe, evaluate, finetune, pretrain, publish


@dataclass
class RunResult:
    run_id: str
    rows: list[dict]
    cache_hits: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    datasets: list[dict] = field(default_factory=list)  # its MLflow dataset inputs (describe.dataset_inputs)
    failures: list[str] = field(default_factory=list)  # eval shards that failed after their retries


def check_inputs(cfg: Config) -> None:
    """preflight() where the data and weights are - a Ray task - not in the driver, which under
    `ray job submit` runs on the head, with neither mounted."""
    get(ray.remote(preflight).options(num_cpus=cfg.resources.task_cpus).remote(cfg))


def prepare(ctx: RunContext, training: bool) -> Prepared:
    """Everything before training and evaluation. Bad data fails first, before anything is written (pretraining
    included), then bad weights."""
    datasets = describe.datasets(ctx, training)
    teacher = describe.teacher(ctx, ctx.timed("pretrain", pretrain.teacher_weights, ctx))
    if training:
        describe.check_training_set(ctx, datasets.infos["train"])
    describe.remember_checked(datasets)
    texts, teacher_cache = caches.build(ctx, teacher, datasets, training)
    calibration = None
    if training and ctx.cfg.calibration.gamma == "auto":
        calibration = ctx.timed("calibration", calibrate.fit, ctx, teacher_cache, texts["train"])
    return Prepared(teacher, datasets, texts, teacher_cache, calibration)


def run(ctx: RunContext, parent_run_id: str | None = None, original: bool = True) -> RunResult:
    """`agft run`: the whole DAG as one MLflow run (nested under parent_run_id if given), started once the inputs
    have been read and the caches built: bad input leaves no run behind. original: also evaluate the un-tuned
    teacher, whose numbers do not depend on the fine-tune."""
    cfg, uri = ctx.cfg, ctx.tracking_uri
    tags = {"mlflow.runName": f"{cfg.train.method}-{cfg.data.train.name}"}
    if parent_run_id:
        tags |= {"mlflow.parentRunId": parent_run_id, "mlflow.runName": f"{cfg.train.method}-seed{cfg.seed}"}
    prepared = prepare(ctx, training=True)
    evaluate.few_classes_note(prepared, "eval.attack", [a.name for a in (cfg.eval.attack, cfg.eval.quick) if a])
    run_id = tracking.start_run(uri, cfg.experiment, cfg.run_params(), tags, cfg.artifact_location)
    with tracking.finishing(uri, run_id):
        # -- record what the run reads
        tracking.tag_run(uri, run_id, {"weights_digest": prepared.teacher.digest})
        datasets = describe.dataset_inputs(prepared)
        tracking.log_datasets(uri, run_id, datasets)
        if METHOD_SPECS[cfg.train.method].calibrated:
            calibrate.log(ctx, run_id, prepared.calibration)
        # -- fine-tune, with the teacher evaluated beside it where the cluster has room for both
        attacks = [a.as_tuple() for a in (cfg.eval.attack, cfg.eval.quick) if a]
        beside = original and evaluate.room_beside(ctx)
        early = evaluate.start(ctx, prepared, {"original": None}, attacks) if beside else None
        tuned = ctx.timed("train", finetune.finetune, ctx, prepared, run_id)
        # -- evaluate
        encoders = ({"original": None} if original and not beside else {}) | {
            "finetuned": tuned.file_named(ENCODER_FILE)
        }
        results = ctx.timed(
            "eval",
            lambda: (
                (evaluate.finish(ctx, early) if early else []) + evaluate.evaluate(ctx, prepared, encoders, attacks)
            ),
        )
        headline = [r for r in results if evaluate.attack_of(r) == cfg.eval.attack.as_tuple()]
        rows = report.accuracy_rows(headline, [r for r in results if r not in headline])
        # -- publish
        ctx.timed("report", publish.report_run, ctx, run_id, rows, tuned)
        if cfg.register_models:
            encoder = tuned.file_named(ENCODER_FILE)
            ctx.timed("register", publish.register_models, ctx, prepared, run_id, rows, encoder)
    return RunResult(run_id, rows, ctx.hits, ctx.seconds, datasets, ctx.failures)


def run_eval(ctx: RunContext) -> RunResult:
    """`agft eval`: the evaluation matrix of eval.matrix (the original teacher and each checkpoint × attack × ε
    on every zero-shot dataset), without training."""
    cfg, matrix = ctx.cfg, ctx.cfg.eval.matrix
    prepared = prepare(ctx, training=False)
    note = evaluate.few_classes_note(prepared, "eval.matrix.attacks", matrix.attacks)
    tags = {"mlflow.runName": "eval-matrix", "kind": "eval"}
    run_id = tracking.start_run(ctx.tracking_uri, cfg.experiment, cfg.run_params(), tags, cfg.artifact_location)
    with tracking.finishing(ctx.tracking_uri, run_id):
        tracking.log_datasets(ctx.tracking_uri, run_id, describe.dataset_inputs(prepared))
        attacks = [attack_key(a, eps, matrix.alpha, matrix.steps) for a in matrix.attacks for eps in matrix.eps]
        encoders = {"original": None, **matrix.checkpoints}
        results = ctx.timed("eval", evaluate.evaluate, ctx, prepared, encoders, attacks)
        rows = report.matrix_rows(results)
        publish.report_matrix(ctx, run_id, results, rows, note)
    return RunResult(run_id, rows, ctx.hits, ctx.seconds, failures=ctx.failures)
