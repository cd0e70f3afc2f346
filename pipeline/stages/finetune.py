"""Stage finetune: the distributed adversarial fine-tune (Ray Train, pipeline.train) as a cache entry keyed by
everything the encoder it trains is a function of. A hit trains nothing; a miss resumes the run's newest
checkpoint if a killed driver left one."""

from __future__ import annotations

from pathlib import Path

from agft_core.cache import CacheEntry, describe_file, filesystem, join, upload
from agft_core.catalog import METHOD_SPECS
from pipeline import tracking
from pipeline.checkpoints import ENCODER_FILE, HISTORY_FILE
from pipeline.context import Prepared, RunContext
from pipeline.stages.calibrate import resolved
from pipeline.train import TrainInputs
from pipeline.trainer import fit, read_history

VERSION = "epoch-seeded-1"  # changes when the same config would train differently
# What does not change the encoder trained: where and how fast it runs, and how many checkpoints are kept.
# train.recipe is left out too: train.recipe: published has already written its values into the section.
NOT_IN_KEY = {"num_workers", "cpus_per_worker", "use_gpu", "max_failures", "start_timeout_s", "keep_checkpoints",
              "recipe"}  # fmt: skip


def inputs(ctx: RunContext, prepared: Prepared, run_id: str) -> TrainInputs:
    """What a Ray Train run of the fine-tune needs besides the config: where the teacher and the caches are."""
    texts = prepared.texts
    return TrainInputs(
        cfg=ctx.cfg,
        teacher=prepared.teacher.source,
        text_files=texts["train"].files(),
        teacher_files=prepared.teacher_cache.files() if prepared.teacher_cache else [],
        train_images=prepared.infos["train"].size,
        train_spec=prepared.specs["train"],
        tracking_uri=ctx.tracking_uri,
        run_id=run_id,
        val_text_files=texts["val"].files() if "val" in texts else [],
        val_spec=prepared.specs.get("val"),
        calibration=prepared.calibration,
    )


def cache_entry(ctx: RunContext, prepared: Prepared) -> CacheEntry:
    cfg = ctx.cfg
    calibration = resolved(cfg, prepared.calibration).calibration  # the fine-tune is keyed by the γ it uses
    val_text = prepared.texts.get("val")
    revision = METHOD_SPECS[cfg.train.method].revision
    return CacheEntry(
        ctx.cache_root,
        "finetune",
        {
            "recipe": VERSION,  # the key's name predates "version": renaming it would orphan every cached fine-tune
            "weights": prepared.teacher.digest,
            "text": prepared.texts["train"].fingerprint,
            "teacher": prepared.teacher_cache.fingerprint if prepared.teacher_cache else None,
            "val_text": val_text.fingerprint if val_text else None,
            "seed": cfg.seed,
            "val_robust": cfg.eval.robust if val_text else None,  # what the history's val_robust_acc counts
            # the images themselves: a method without a teacher cache has no other key that holds them
            "train_data": prepared.infos["train"].identity,
            "val_data": prepared.infos["val"].identity if val_text else None,
            "decode": cfg.data.decode,  # the order the images come in: a DistributedSampler's or Ray Data's stream
            "val_batch_size": cfg.eval.batch_size if val_text else None,  # the validation attack's random starts
            "train": cfg.train.model_dump(mode="json", exclude=NOT_IN_KEY),
            "calibration": calibration.model_dump(mode="json"),
            "world_size": cfg.train.num_workers,
            **({"method_revision": revision} if revision else {}),
        },
    )


def finetune(ctx: RunContext, prepared: Prepared, run_id: str) -> CacheEntry:
    """The fine-tuned encoder and its history, from the cache or trained; its epochs logged to run_id."""
    entry = cache_entry(ctx, prepared)
    if ctx.cached("train", entry):
        tracking.log_history(ctx.tracking_uri, run_id, read_history(entry.file_named(HISTORY_FILE)))
        return entry
    checkpoints, name = ctx.storage("ray_train"), f"finetune-{entry.fingerprint}"
    if "train" in ctx.rerun:
        fs, path = filesystem(join(checkpoints, name))
        fs.delete_dir_contents(path, missing_dir_ok=True)
    checkpoint = fit(inputs(ctx, prepared, run_id), checkpoints, name)
    with entry.attempt() as attempt, checkpoint.as_directory() as d:
        for file in (ENCODER_FILE, HISTORY_FILE):
            upload(Path(d) / file, join(attempt, file))
        entry.commit(attempt, [describe_file(join(attempt, file)) for file in (ENCODER_FILE, HISTORY_FILE)])
    # The epochs the workers could not log (tracking server away, or trained before a restart).
    tracking.log_history(ctx.tracking_uri, run_id, read_history(entry.file_named(HISTORY_FILE)))
    return entry
