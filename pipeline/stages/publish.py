"""Stage publish: what a run leaves in MLflow. Its table, plots, timeline and fine-tuned encoder as artifacts
(report), the eval matrix's (report_matrix), and its models registered under the experiment's name
(register_models): a servable CLIP made by a Ray task, or the version already registered with the same weights."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from agft_core.cache import CacheEntry, fingerprint, local_path, read_bytes
from pipeline import registry, report, tracking
from pipeline.checkpoints import ENCODER_FILE
from pipeline.config.loading import dump_yaml
from pipeline.config.sections import ROBUST_MEANING
from pipeline.context import Prepared, RunContext
from pipeline.remote import get
from pipeline.stages.evaluate import INCOMPLETE
from tasks.describe import file_digest
from tasks.publish import SERVED_CLIP, SERVED_EXAMPLE, servable_clip


def report_run(ctx: RunContext, run_id: str, rows: list[dict], tuned: CacheEntry) -> None:
    """The run's table, plots, timeline and fine-tuned encoder, to MLflow."""
    cfg = ctx.cfg
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        report.write_csv(rows, out / "zero_shot_accuracy.csv")
        title = f"{cfg.train.method.upper()}: zero-shot clean vs robust accuracy\n{cfg.eval.caption()}"
        report.plot_accuracy(rows, out / "zero_shot_accuracy.png", title)
        names = ("config.yaml", "zero_shot_accuracy.csv", "zero_shot_accuracy.png", *_timeline(ctx, out))
        encoder = Path(local_path(tuned.file_named(ENCODER_FILE)))
        tracking.log_results(
            ctx.tracking_uri, run_id, report.dataset_metrics(rows), [out / n for n in names] + [encoder]
        )
    tracking.tag_run(ctx.tracking_uri, run_id, {"mlflow.note.content": description(ctx, rows)})


def description(ctx: RunContext, rows: list[dict]) -> str:
    """The run's description on its MLflow page: what it trained, its headline table and how to run it again."""
    cfg = ctx.cfg
    gamma = "auto (the fitted γ is the metric calibration_gamma)" if cfg.calibration.gamma == "auto" else None
    gamma, inv_tau = gamma or cfg.calibration.gamma, cfg.calibration.inv_tau
    return (
        f"**{cfg.train.method.upper()}** fine-tune of `{cfg.model.arch}` ({cfg.model.weights}) on "
        f"`{cfg.data.train.name}`: {cfg.train.epochs} epochs, γ = {gamma}, 1/τ = {inv_tau}, training "
        f"ε = {255 * cfg.train.attack.eps:g}/255.\n\n"
        f"Zero-shot top-1 accuracy (%); {cfg.eval.caption()}.\n\n"
        + report.table(rows, percent=True)
        + "\nTo run it again: download this run's `config.yaml` artifact, then `agft run --config config.yaml` "
        "(its caches make every step that did not change a cache hit).\n"
    )


def report_matrix(ctx: RunContext, run_id: str, results: list[dict], rows: list[dict], note: str) -> None:
    """`agft eval`'s table (markdown and CSV) and plot, to MLflow."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "config.yaml").write_text(dump_yaml(ctx.cfg))
        report.write_csv(rows, out / "eval_matrix.csv")
        caption = f"Zero-shot top-1 accuracy (%); {ROBUST_MEANING[ctx.cfg.eval.robust]}{note}\n\n"
        (out / "eval_matrix.md").write_text(caption + report.table(rows, percent=True))
        report.plot_matrix(rows, out / "eval_matrix.png")
        names = ("config.yaml", "eval_matrix.csv", "eval_matrix.md", "eval_matrix.png", *_timeline(ctx, out))
        tracking.log_results(ctx.tracking_uri, run_id, report.matrix_metrics(results), [out / n for n in names])


def _timeline(ctx: RunContext, out: Path) -> tuple[str, str]:
    """The command's timeline (a bar per step and per Ray task: when, where, cached or not) as JSON and a plot."""
    (out / "timeline.json").write_text(json.dumps(ctx.timeline, indent=1))
    report.plot_timeline(ctx.timeline, out / "timeline.png")
    return "timeline.json", "timeline.png"


def _headline_tags(rows: list[dict], model: str) -> dict[str, str]:
    """A registered version's summary of what the run measured for one model ("original" or "finetuned"): its mean
    zero-shot clean and robust accuracy over accuracy_rows' datasets; the rest stays on the run."""
    (mean,) = [row for row in rows if row["dataset"] == "mean"]
    return {f"mean_{kind}": f"{mean[model + '_' + kind]:.4f}" for kind in ("clean", "robust")}


def register_models(ctx: RunContext, prepared: Prepared, run_id: str, rows: list[dict], encoder: str) -> None:
    """The fine-tuned CLIP, and the original teacher when this run evaluated it, each tagged with its mean zero-shot
    accuracy in the run that registered it and that run's page; weights registered before keep their version.
    Nothing is registered while a cell is incomplete: a version's tags would hold a mean over the cells measured."""
    if any(INCOMPLETE in row.values() for row in rows):
        ctx.log("[registry] nothing registered: some cells are incomplete; the rerun that completes them registers")
        return
    page = {"run": tracking.run_pages(ctx.tracking_uri, run_id)[0]}
    tags = page | _headline_tags(rows, "finetuned")
    versions = {registry.FINETUNED: register_model(ctx, prepared, run_id, encoder, tags)}
    if "original_clean" in rows[0]:
        tags = page | _headline_tags(rows, "original")
        versions[registry.ORIGINAL] = register_model(ctx, prepared, run_id, None, tags)
    measured = report.dataset_metrics(rows)
    for role, version in versions.items():
        model = "finetuned" if role == registry.FINETUNED else "original"
        keys = [key for key in measured if key.startswith(f"{model}_")]
        registry.link(ctx.tracking_uri, run_id, version, keys)
    ctx.log(
        f"[registry] {ctx.cfg.experiment}: "
        + ", ".join(
            f"version {v.version} ({role}{'' if v.run_id == run_id else ', unchanged: registered by run ' + v.run_id})"
            for role, v in versions.items()
        )
    )


def register_model(
    ctx: RunContext, prepared: Prepared, run_id: str, encoder: str | None, tags: dict[str, str]
) -> registry.ModelVersion:
    """The teacher, fine-tuned by the image tower in the weights file `encoder` if given, logged to the run
    as an MLflow model and registered as a version of the model named after the experiment; or the version
    already registered with the same weights (a rerun from warm caches registers nothing new)."""
    cfg, teacher = ctx.cfg, prepared.teacher
    encoder_digest = encoder and get(file_digest.options(**ctx.cpu_options()).remote(encoder))
    digest = fingerprint({"teacher": teacher.digest, "encoder": encoder_digest}) if encoder else teacher.digest
    found = registry.registered_version(ctx.tracking_uri, cfg.experiment, digest)
    if found:
        return found
    role = {"role": registry.FINETUNED, "method": cfg.train.method} if encoder else {"role": registry.ORIGINAL}
    clip = _servable(ctx, prepared, encoder, encoder_digest)
    mine = registry.register(ctx.tracking_uri, run_id, cfg.experiment, clip, role | {"model_digest": digest} | tags)
    return registry.keep_first(ctx.tracking_uri, mine, digest)


def _servable(
    ctx: RunContext, prepared: Prepared, encoder: str | None, encoder_digest: str | None
) -> registry.ServableClip:
    """The teacher, with the fine-tuned image tower in the weights file `encoder` (of SHA-256 encoder_digest)
    if given, as a servable CLIP answering with the training set's classes: from the cache, or made by a Ray
    task."""
    teacher, train = prepared.teacher, prepared.infos["train"]
    entry = CacheEntry(
        ctx.cache_root,
        "servable",
        {"weights": teacher.digest, "arch": teacher.arch, "example": train.identity, "encoder": encoder_digest},
    )
    if not ctx.cached("model", entry, registry.FINETUNED if encoder else registry.ORIGINAL):
        with entry.attempt() as attempt:
            task = servable_clip.options(**ctx.cpu_options())
            ref = task.remote(teacher.source, prepared.specs["train"], encoder_weights=encoder, out_dir=attempt)
            entry.commit(attempt, get(ref, "data.train"))
    return registry.ServableClip(
        entry.file_named(SERVED_CLIP),
        teacher.arch,
        train.classnames,
        train.templates,
        read_bytes(entry.file_named(SERVED_EXAMPLE)),
    )
