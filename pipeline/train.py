"""The fine-tune on Ray Train: what each worker runs. fit() (pipeline/trainer.py) starts it; the finetune stage
caches what it trains.

Each of train.num_workers workers loads the teacher's image tower (the student), the class-prompt cache and,
for a method that reads it, the teacher cache, then trains on its share of data.train (its DistributedSampler
shard decoded by a DataLoader, or its split of a Ray Data stream decoded on any node's CPUs: data.decode):

    for each epoch (reseeded from seed, epoch and rank, so a resumed run replays an uninterrupted one):
        train_step per batch    PGD on the method's attack loss, then one optimizer step on its loss
        validate                clean and robust accuracy on the worker's share of train.validation
        all_reduce the totals   one collective per epoch
        rank 0                  logs the epoch to MLflow and reports a checkpoint (encoder, optimizer, history)

Meanwhile each node's first worker samples the node's CPU, memory, disk, network and GPU use into the run
(system_metrics_interval).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.torch import get_device, prepare_model
from torch.utils.data import Dataset, Subset

from agft_core.cache import embeddings_of, read_parquet
from agft_core.calibration import Calibration
from agft_core.catalog import METHOD_SPECS, DatasetSpec
from agft_core.datasets import load_dataset
from agft_core.errors import first_line
from agft_core.evaluate import zero_shot_counts
from agft_core.methods import Method, adversarial_step, build_method
from agft_core.model import ImageEncoder, create_clip, logit_scale, save_weights
from agft_core.optim import compress_gradients, warmup_cosine
from pipeline.checkpoints import ENCODER_FILE, EPOCH_END, HISTORY_FILE, STATE_FILE, resume_point
from pipeline.config.schema import Config, TrainConfig
from pipeline.ingest import STREAMED, LoaderIngest, StreamedIngest
from tasks.common import ModelSource, cpu_fallback, say

EPOCH_METRICS = ("loss", "train_robust_acc", "lr", "val_clean_acc", "val_robust_acc")  # what each epoch reports


@dataclass(frozen=True)
class TrainInputs:
    """Everything a worker needs besides the config: the teacher and where the caches are."""

    cfg: Config
    teacher: ModelSource
    text_files: list[str]
    teacher_files: list[str]  # empty for a method that does not read the teacher cache
    train_images: int  # how many images data.train holds
    train_spec: DatasetSpec  # data.train as the describe stage found it (with corrupt: skip, the images left out)
    tracking_uri: str
    run_id: str
    val_text_files: list[str] = ()
    val_spec: DatasetSpec | None = None  # train.validation.dataset, likewise
    calibration: Calibration | None = None  # the teacher's fitted logit scale, for calibration.gamma: auto
    # The newest complete checkpoint directory in the run's storage, which Ray Train may not know of:
    # a driver killed after a checkpoint's upload but before the controller recorded it.
    newest_on_disk: str | None = None
    # Rank 0 logs each epoch to run_id; a sweep's trial does not: its driver logs what Tune received (sweep._Progress),
    # so that the run holds exactly the epochs Tune saw, also of a trial ASHA stops.
    log_epochs: bool = True


@dataclass
class Trainee:
    """What a train step reads and updates: the student (as DDP wraps it, and bare for the attack, which bypasses
    DDP's gradient hooks), its method, optimizer, schedule and grad scaler, the training classes' prompt
    embeddings and the teacher's cached embeddings by image index (None: the method reads none)."""

    model: torch.nn.Module
    raw: torch.nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    text_emb: torch.Tensor
    teacher_emb: torch.Tensor | None


class Totals:
    """An epoch's sums by name, kept on the training device (no host sync per step, and nccl reduces only CUDA
    tensors) and summed over the workers in one all_reduce."""

    NAMES = ("loss", "robust_correct", "images", "val_clean_correct", "val_robust_correct", "val_images")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    def add(self, **values) -> None:
        for name, value in values.items():
            self.sums[self.NAMES.index(name)] += value

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def __getitem__(self, name: str) -> float:
        return self.sums[self.NAMES.index(name)].item()


def make_optimizer(train: TrainConfig, parameters) -> torch.optim.Optimizer:
    if train.optimizer == "adamw":  # FARE's published recipe
        return torch.optim.AdamW(parameters, lr=train.effective_lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(parameters, lr=train.effective_lr, momentum=train.momentum, weight_decay=train.weight_decay)


def train_step(trainee: Trainee, train: TrainConfig, batch: tuple, totals: Totals) -> None:
    """One adversarial update on a batch (x, labels, image indices), added to the epoch's totals."""
    x, y, idx = batch
    cached = trainee.teacher_emb[idx.to(x.device)] if trainee.teacher_emb is not None else None
    loss, student_emb = adversarial_step(
        trainee.model,
        trainee.raw,
        trainee.method,
        x,
        y,
        cached_teacher=cached,
        attack=train.attack,
        amp=train.amp,
        optimizer=trainee.optimizer,
        scaler=trainee.scaler,
    )
    trainee.schedule.step()
    correct = ((student_emb @ trainee.text_emb.T).argmax(-1) == y).sum()
    totals.add(loss=loss.double() * len(y), robust_correct=correct.double(), images=len(y))


def validate(trainee: Trainee, cfg: Config, shard: Dataset, text: torch.Tensor, rank: int, totals: Totals) -> None:
    """Clean and robust (train.validation.attack) accuracy on this worker's share of the validation set, added to
    the epoch's totals."""
    attack, device = cfg.train.validation.attack, text.device
    # counts, not fractions: a worker's share may hold no image (fewer validation images than workers)
    counts = zero_shot_counts(
        trainee.raw,
        text,
        trainee.method.scale,
        shard,
        eps=attack.eps,
        alpha=attack.alpha,
        steps=attack.steps,
        batch_size=cfg.eval.batch_size,
        device=device,
        generator=torch.Generator(device).manual_seed(cfg.seed + rank),
        loader_workers=cfg.resources.loader_processes(cfg.train.cpus_per_worker),
    )
    totals.add(val_clean_correct=counts["clean"], val_robust_correct=counts[cfg.eval.robust], val_images=counts["n"])


def train_loop(inputs: TrainInputs) -> None:
    # A missed epoch is logged with the next one, so the workers that log retry the tracking server briefly
    # instead of MLflow's default backoff (minutes), which would stall training.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    context = ray.train.get_context()
    with _node_system_metrics(inputs, context):
        _train(inputs, context)


def _train(inputs: TrainInputs, context) -> None:
    cfg = inputs.cfg
    # -- this worker
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _quiet_train_reports(cfg.verbose)
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    torch.manual_seed(cfg.seed + rank)  # initial weights and heads; each epoch reseeds (_seed_epoch)
    device = cpu_fallback(f"train rank {rank}", get_device())

    # -- the student and the caches
    teacher = inputs.teacher
    clip = create_clip(teacher.arch, teacher.weights)
    scale = logit_scale(clip)
    encoder = ImageEncoder.from_clip(clip).to(device)
    del clip  # the text tower is frozen and its embeddings come from the cache
    text_emb = torch.from_numpy(embeddings_of(read_parquet(inputs.text_files))).to(device)
    teacher_emb = None
    if inputs.teacher_files:
        teacher_emb = torch.from_numpy(embeddings_of(read_parquet(inputs.teacher_files).sort_by("index"))).to(device)

    # -- data, optimizer, schedule
    if cfg.data.decode == "ray_data":
        ingest = StreamedIngest(ray.train.get_dataset_shard(STREAMED), cfg, inputs.train_images, world_size, device)
    else:
        images = load_dataset(inputs.train_spec, teacher.image_size).images
        ingest = LoaderIngest(cfg, images, rank, world_size, device)
    steps_per_epoch = len(ingest)
    optimizer = make_optimizer(cfg.train, encoder.parameters())
    schedule = warmup_cosine(optimizer, cfg.train.warmup_steps(steps_per_epoch), steps_per_epoch * cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16" and device.type == "cuda")

    # -- resume
    start_epoch, history = 0, []
    checkpoint, state = resume_point(ray.train.get_checkpoint(), inputs.newest_on_disk, device)
    if checkpoint:
        start_epoch, history = restore(state, encoder, optimizer, schedule, scaler)

    # -- the method
    model = prepare_model(encoder, move_to_device=device)
    if compress_gradients(model, cfg.train.grad_compression) and rank == 0:
        say(f"[train] DDP all-reduces the gradients in {cfg.train.grad_compression}")
    raw = model.module if hasattr(model, "module") else model
    spec, frozen = METHOD_SPECS[cfg.train.method], None
    if spec.frozen_encoder:
        frozen = ImageEncoder.from_clip(create_clip(teacher.arch, teacher.weights)).to(device)
        frozen.eval().requires_grad_(False)
    weights = getattr(cfg.train, cfg.train.method).model_dump() if spec.loss_weights else {}
    method = build_method(
        cfg.train.method,
        text_emb,
        scale,
        gamma=cfg.calibration.gamma,
        inv_tau=cfg.calibration.inv_tau,
        teacher=frozen,
        **weights,
    )
    trainee = Trainee(model, raw, method, optimizer, schedule, scaler, text_emb, teacher_emb)

    # -- the validation share
    if cfg.train.validation:
        val_data = load_dataset(inputs.val_spec, teacher.image_size)
        val_shard = Subset(val_data.images, range(rank, len(val_data.images), world_size))
        val_text = torch.from_numpy(embeddings_of(read_parquet(inputs.val_text_files))).to(device)

    if start_epoch >= cfg.train.epochs:
        # Restarted after the last epoch (e.g. a resumed sweep re-launching a trial that had finished
        # training): report the final result again instead of training, so Tune and fit() see it.
        ray.train.report(history[-1], checkpoint=checkpoint if rank == 0 else None)
        return

    for epoch in range(start_epoch, cfg.train.epochs):
        # -- train
        _seed_epoch(cfg.seed, epoch, rank)
        model.train()
        totals = Totals(device)
        for x, y, idx in ingest.epoch(epoch):
            batch = (x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx)
            train_step(trainee, cfg.train, batch, totals)
        # -- validate
        if cfg.train.validation:
            validate(trainee, cfg, val_shard, val_text, rank, totals)
        # -- report
        totals.all_reduce()
        metrics = {
            "epoch": epoch + 1,
            "loss": totals["loss"] / totals["images"],
            "train_robust_acc": totals["robust_correct"] / totals["images"],
            "lr": schedule.get_last_lr()[0],
        }
        if cfg.train.validation:
            metrics |= {
                "val_clean_acc": totals["val_clean_correct"] / totals["val_images"],
                "val_robust_acc": totals["val_robust_correct"] / totals["val_images"],
            }
        history.append(metrics | {EPOCH_END: time.time()})
        if rank == 0:
            if inputs.log_epochs:
                _log_quietly(inputs, history)
            say(
                f"[train] epoch {epoch + 1}/{cfg.train.epochs}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
            )
            _report_with_checkpoint(trainee, teacher.arch, epoch, history, metrics)
        else:
            ray.train.report(metrics)


def restore(state: dict, encoder, optimizer, schedule, scaler: torch.amp.GradScaler) -> tuple[int, list[dict]]:
    """A checkpoint's state loaded into the fine-tune's parts: the epoch to start from and the history so far."""
    encoder.load_state_dict(state["encoder"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if state.get("scaler"):  # empty when saved by a disabled scaler (not fp16 on CUDA), absent in older checkpoints
        scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, json.loads(state["history"])


def _report_with_checkpoint(trainee: Trainee, arch: str, epoch: int, history: list[dict], metrics: dict) -> None:
    """Rank 0's report: the epoch's metrics with a checkpoint of the student, the optimizer, the schedule, fp16's
    loss scale (a resumed run would otherwise start again from 2^16 and skip steps finding it) and the history,
    from which a restarted run resumes."""
    encoder = trainee.raw
    state = {
        "encoder": encoder.state_dict(),
        "optimizer": trainee.optimizer.state_dict(),
        "schedule": trainee.schedule.state_dict(),
        "scaler": trainee.scaler.state_dict(),
        "epoch": epoch,
        "history": json.dumps(history),
    }
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        save_weights(encoder, Path(d) / ENCODER_FILE, arch)
        (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


@contextmanager
def _node_system_metrics(inputs: TrainInputs, context) -> Iterator[None]:
    """Each node's first worker samples the node's system metrics into the run while it trains."""
    interval = inputs.cfg.system_metrics_interval
    if context.get_local_rank() != 0 or interval is None:
        yield
        return
    from pipeline.tracking import system_metrics  # MLflow: imported by one worker per node

    with system_metrics(inputs.tracking_uri, inputs.run_id, f"node{context.get_node_rank()}", interval):
        yield


def _quiet_train_reports(verbose: bool) -> None:
    """Ray Train 2.60 logs every rank's report ("Reporting training result N: TrainingReport(...)") through
    a logger named after its file's path, which its LoggingConfig does not reach (that filters the
    "ray.train" names): it is quieted here, and back with --verbose."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.INFO if verbose else logging.WARNING)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every random draw of an epoch (PGD starts, DataLoader workers' seeds) follows from (seed, epoch,
    rank) alone, so a run resumed from a checkpoint replays the epochs an uninterrupted run trains."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]))


def _log_quietly(inputs: TrainInputs, history: list[dict]) -> None:
    """Training does not wait on the tracking server: while it is unreachable, epochs stay in the
    checkpointed history and are logged once it answers."""
    from pipeline.tracking import log_history  # MLflow: imported by the one worker that logs

    try:
        log_history(inputs.tracking_uri, inputs.run_id, history)
    except Exception as exc:  # noqa: BLE001 - any tracking failure: MlflowException, requests, OSError
        say(f"[train] WARNING: epoch {len(history)} not logged yet ({first_line(exc)}); training goes on", sys.stderr)
