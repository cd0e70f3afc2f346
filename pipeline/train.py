"""The Ray Train step: distributed adversarial fine-tuning of the image encoder (AGFT or TeCoA)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist
from ray.exceptions import ActorDiedError
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device, prepare_model
from ray.train.v2._internal.constants import DEFAULT_WORKER_GROUP_START_TIMEOUT_S, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from agft_core.cache import basename, embeddings_of, exists, filesystem, join, read_bytes, read_parquet
from agft_core.calibration import Calibration
from agft_core.datasets import load_dataset
from agft_core.errors import first_line
from agft_core.evaluate import zero_shot_accuracy
from agft_core.methods import NEEDS_TEACHER, adversarial_step, build_method
from agft_core.model import ImageEncoder, create_clip, logit_scale, save_weights
from agft_core.optim import warmup_cosine
from pipeline.config import Config, ConfigError, TrainConfig, with_overrides
from pipeline.tracking import EPOCH_END, log_history
from tasks import steps
from tasks.common import cpu_fallback, say

ENCODER_FILE = "image_encoder.safetensors"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
EPOCH_METRICS = ("loss", "train_robust_acc", "lr", "val_clean_acc", "val_robust_acc")  # what each epoch reports
# Part of the fine-tune cache's fingerprint: changes when the same config would train differently.
FINETUNE_RECIPE = "epoch-seeded-1"


@dataclass(frozen=True)
class TrainInputs:
    """Everything a worker needs besides the config: where the caches and the teacher are."""

    cfg: Config
    teacher_weights: str | None
    image_size: int
    text_files: list[str]
    teacher_files: list[str]
    tracking_uri: str
    run_id: str
    val_text_files: list[str] = ()
    calibration: Calibration | None = None  # the teacher's fitted logit scale, for calibration.gamma: auto
    # The newest complete checkpoint directory in the run's storage, which Ray Train may not know of:
    # a driver killed after a checkpoint's upload but before the controller recorded it.
    newest_on_disk: str | None = None
    # Rank 0 logs each epoch to run_id; a sweep's trial does not: its driver logs what Tune received (sweep._Progress),
    # so that the run holds exactly the epochs Tune saw, also of a trial ASHA stops.
    log_epochs: bool = True


class _Indexed(Dataset):
    """Yields (pixels, label, index) so a batch can look up its rows of the teacher cache."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.images[i]
        return x, y, i


def make_optimizer(train: TrainConfig, parameters) -> torch.optim.Optimizer:
    if train.optimizer == "adamw":  # FARE's published recipe
        return torch.optim.AdamW(parameters, lr=train.effective_lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(parameters, lr=train.effective_lr, momentum=train.momentum, weight_decay=train.weight_decay)


def resolved(cfg: Config, calibration: Calibration | None) -> Config:
    """cfg with calibration.gamma: auto replaced by the γ the teacher's fitted logit scale gives at cfg's own
    1/τ (which a sweep's trial may have changed)."""
    if cfg.calibration.gamma != "auto":
        return cfg
    if calibration is None:
        raise ConfigError("calibration.gamma: auto needs the fit on the teacher cache; this run has none")
    return with_overrides(cfg, {"calibration.gamma": calibration.gamma_for(cfg.calibration.inv_tau)})


def train_loop(inputs: TrainInputs) -> None:
    cfg = inputs.cfg
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    _quiet_train_reports(cfg.verbose)
    # A missed epoch is logged with the next one, so the rank-0 worker retries the tracking server
    # briefly instead of MLflow's default backoff (minutes), which would stall training.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    torch.manual_seed(cfg.seed + rank)  # initial weights and heads; each epoch reseeds (_seed_epoch)
    device = cpu_fallback(f"train rank {rank}", get_device())

    clip = create_clip(cfg.model.arch, inputs.teacher_weights)
    scale = logit_scale(clip)
    encoder = ImageEncoder.from_clip(clip).to(device)
    del clip  # the text tower is frozen and its embeddings come from the cache
    text_emb = torch.from_numpy(embeddings_of(read_parquet(inputs.text_files))).to(device)
    teacher = read_parquet(inputs.teacher_files).sort_by("index")
    teacher_emb = torch.from_numpy(embeddings_of(teacher)).to(device)

    data = load_dataset(cfg.data.train.spec(cfg.data.world_seed), inputs.image_size)
    sampler = DistributedSampler(
        _Indexed(data.images), num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    loader = DataLoader(
        _Indexed(data.images),
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.resources.loader_workers,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    optimizer = make_optimizer(cfg.train, encoder.parameters())
    schedule = warmup_cosine(optimizer, cfg.train.warmup_steps(steps_per_epoch), steps_per_epoch * cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16" and device.type == "cuda")

    start_epoch, history = 0, []
    checkpoint, state = _resume_point(ray.train.get_checkpoint(), inputs.newest_on_disk, device)
    if checkpoint:
        encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, history = state["epoch"] + 1, json.loads(state["history"])

    model = prepare_model(encoder, move_to_device=device)
    raw = model.module if hasattr(model, "module") else model  # attacks bypass DDP's gradient hooks
    frozen = None
    if cfg.train.method in NEEDS_TEACHER:
        frozen = ImageEncoder.from_clip(create_clip(cfg.model.arch, inputs.teacher_weights)).to(device)
        frozen.eval().requires_grad_(False)
    weights = {"pmg_aft": cfg.train.pmg_aft, "tga_zsr": cfg.train.tga_zsr}.get(cfg.train.method)
    method = build_method(
        cfg.train.method,
        text_emb,
        scale,
        gamma=cfg.calibration.gamma,
        inv_tau=cfg.calibration.inv_tau,
        teacher=frozen,
        **(weights.model_dump() if weights else {}),
    )

    validation = cfg.train.validation
    if validation:
        val_data = load_dataset(validation.dataset.spec(cfg.data.world_seed), inputs.image_size)
        val_shard = Subset(val_data.images, range(rank, len(val_data.images), world_size))
        val_text = torch.from_numpy(embeddings_of(read_parquet(inputs.val_text_files))).to(device)

    if start_epoch >= cfg.train.epochs:
        # Restarted after the last epoch (e.g. a resumed sweep re-launching a trial that had finished
        # training): report the final result again instead of training, so Tune and fit() see it.
        ray.train.report(history[-1], checkpoint=checkpoint if rank == 0 else None)
        return

    for epoch in range(start_epoch, cfg.train.epochs):
        _seed_epoch(cfg.seed, epoch, rank)
        sampler.set_epoch(epoch)
        model.train()
        # Sums stay on the training device: no host sync per step, and nccl reduces only CUDA tensors.
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, robust correct, images
        for x, y, idx in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, student_emb = adversarial_step(
                model,
                raw,
                method,
                x,
                y,
                teacher_emb[idx.to(device)],
                cfg.train.attack,
                cfg.train.amp,
                optimizer,
                scaler,
            )
            schedule.step()
            correct = ((student_emb @ text_emb.T).argmax(-1) == y).sum()
            totals += torch.stack([loss.double() * len(y), correct.double(), totals.new_tensor(len(y))])
        if validation:
            v = validation.attack
            scores = zero_shot_accuracy(
                raw,
                val_text,
                scale,
                val_shard,
                eps=v.eps,
                alpha=v.alpha,
                steps=v.steps,
                batch_size=cfg.eval.batch_size,
                device=device,
                generator=torch.Generator(device).manual_seed(cfg.seed + rank),
                loader_workers=cfg.resources.loader_workers,
            )
            totals = torch.cat(
                [
                    totals,
                    totals.new_tensor(
                        [scores["clean"] * scores["n"], scores[cfg.eval.robust] * scores["n"], scores["n"]]
                    ),
                ]
            )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        metrics = {
            "epoch": epoch + 1,
            "loss": totals[0].item() / totals[2].item(),
            "train_robust_acc": totals[1].item() / totals[2].item(),
            "lr": schedule.get_last_lr()[0],
        }
        if validation:
            metrics |= {
                "val_clean_acc": totals[3].item() / totals[5].item(),
                "val_robust_acc": totals[4].item() / totals[5].item(),
            }
        history.append(metrics | {EPOCH_END: time.time()})
        if rank == 0:
            if inputs.log_epochs:
                _log_quietly(inputs, history)
            say(
                f"[train] epoch {epoch + 1}/{cfg.train.epochs}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
            )
            with tempfile.TemporaryDirectory() as d:
                torch.save(
                    {
                        "encoder": encoder.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "epoch": epoch,
                        "history": json.dumps(history),
                    },
                    Path(d) / STATE_FILE,
                )
                save_weights(encoder, Path(d) / ENCODER_FILE, cfg.model.arch)
                (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def _resume_point(
    recorded: Checkpoint | None, newest_on_disk: str | None, device: torch.device
) -> tuple[Checkpoint | None, dict | None]:
    """The checkpoint to resume from and its state: Ray Train's, or a newer complete one on disk."""
    candidates = [recorded] if recorded else []
    if newest_on_disk and (not recorded or basename(newest_on_disk) > basename(recorded.path)):
        fs, path = filesystem(newest_on_disk)
        candidates.insert(0, Checkpoint(path, filesystem=fs))
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as d:
                return checkpoint, torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            if checkpoint is recorded:
                raise  # Ray Train's own checkpoint must load
            say(f"[train] WARNING: {newest_on_disk} is incomplete; resuming from Ray Train's checkpoint", sys.stderr)
    return None, None


def _checkpoint_dirs(run_dir: str) -> list[str]:
    """The checkpoint directories of a Ray Train run, oldest first: Ray names them checkpoint_<time>."""
    fs, path = filesystem(run_dir)
    found = [
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    ]
    return [join(run_dir, name) for name in sorted(found)]


def newest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint directory of a Ray Train run that holds all our files."""
    for directory in reversed(_checkpoint_dirs(run_dir)):
        if all(exists(join(directory, f)) for f in (STATE_FILE, ENCODER_FILE, HISTORY_FILE)):
            return directory
    return None


def _prune_checkpoints(run_dir: str, keep: int) -> None:
    """Ray Train keeps its newest `keep` checkpoints, but not those uploaded by an attempt that failed
    before Ray recorded them (a worker killed during a report): after the run, only the newest stay."""
    for directory in _checkpoint_dirs(run_dir)[:-keep]:
        fs, path = filesystem(directory)
        fs.delete_dir(path)


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
    try:
        log_history(inputs.tracking_uri, inputs.run_id, history)
    except Exception as exc:  # noqa: BLE001 - any tracking failure: MlflowException, requests, OSError
        say(f"[train] WARNING: epoch {len(history)} not logged yet ({first_line(exc)}); training goes on", sys.stderr)


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


def _fits(shape: dict[str, float], node: dict[str, float]) -> int:
    """How many requests of this shape one node's total resources hold (Ray counts in steps of 1e-4)."""
    return int(min(node.get(key, 0) / amount for key, amount in shape.items() if amount) + 1e-6)


def trainers_fitting(cfg: TrainConfig, nodes: list[dict[str, float]]) -> int:
    """How many trainers (train.num_workers workers each) the nodes' total resources hold at once; at least 1."""
    return max(1, sum(_fits(worker_resources(cfg), node) for node in nodes) // cfg.num_workers)


def room_beside_training(cfg: Config, nodes: list[dict[str, float]]) -> bool:
    """Whether a DAG task still fits on some node once the trainer's workers are placed, each request on one
    node as Ray places them: the workers first, each on the node with the least room that holds it."""
    free = [dict(node) for node in nodes]
    worker, task = worker_resources(cfg.train), {"CPU": cfg.resources.task_cpus, "GPU": cfg.resources.task_gpus}
    for _ in range(cfg.train.num_workers):
        fitting = [node for node in free if _fits(worker, node)]
        if not fitting:
            return False
        node = min(fitting, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        for key, amount in worker.items():
            node[key] -= amount
    return any(_fits(task, node) for node in free)


def _cluster_shape() -> tuple[list[dict[str, float]], list[tuple[dict[str, float], int]] | None]:
    """Each alive node's total resources, and the autoscaler's (resources, max nodes; -1 unbounded) per node
    type, or None without an autoscaler."""
    # The autoscaler publishes its node types in the GCS; ray.autoscaler has no public reader yet.
    from ray._private.state import state

    config = state.get_cluster_config()
    groups = [(dict(g.resources), g.max_count) for g in config.node_group_configs] if config else None
    return [node["Resources"] for node in ray.nodes() if node["Alive"]], groups


def trainer_room(cfg: Config) -> int:
    """trainers_fitting on the cluster's alive nodes, or on its worker groups at their autoscaler's maximum
    (bounded ones) if that holds more."""
    alive, groups = _cluster_shape()
    scaled = [resources for resources, max_count in groups or [] for _ in range(max(0, max_count))]
    return max(trainers_fitting(cfg.train, alive), trainers_fitting(cfg.train, scaled))


class Demand(NamedTuple):
    """`count` requests of `shape` that must be placed together, and the settings that size them."""

    label: str
    shape: dict[str, float]
    count: int
    to_lower: str
    gpu_setting: str


def demands(cfg: Config, trainer: bool, tasks: bool) -> list[Demand]:
    """The trainer's workers, placed at once, and the largest single DAG task (the input check, caches, eval)."""
    workers = Demand(
        f"train.num_workers={cfg.train.num_workers} workers",
        worker_resources(cfg.train),
        cfg.train.num_workers,
        "train.num_workers or train.cpus_per_worker",
        "train.use_gpu=false",
    )
    task = Demand(
        "a DAG task (input check, caches, eval)",
        {"CPU": cfg.resources.task_cpus, "GPU": cfg.resources.task_gpus},
        1,
        "resources.task_cpus or resources.task_gpus",
        "resources.task_gpus=0",
    )
    return [workers] * trainer + [task] * tasks


def placement_problem(
    cfg: Config,
    nodes: list[dict[str, float]],
    node_groups: list[tuple[dict[str, float], int]] | None,
    *,
    trainer: bool = True,
    tasks: bool = True,
) -> tuple[str | None, bool]:
    """(message, fatal) when the cluster cannot hold the trainer's workers (`trainer`) or a DAG task (`tasks`)
    now, else (None, False).

    nodes: each alive node's total resources. node_groups: the autoscaler's (resources, max nodes; -1
    unbounded) per node type, or None without an autoscaler. Fatal: no autoscaler could ever add room.
    """
    waiting = []
    for demand in demands(cfg, trainer, tasks):
        now = sum(_fits(demand.shape, node) for node in nodes)
        if now >= demand.count:
            continue
        shape = " + ".join(f"{amount:g} {key}" for key, amount in demand.shape.items() if amount)
        need = f"{demand.label} of {shape} each; the cluster's nodes hold {now}"
        anywhere = nodes + [resources for resources, _ in node_groups or []]
        no_gpus = demand.shape.get("GPU") and not any(node.get("GPU") for node in anywhere)
        fix = (
            f"this cluster has no GPU: set {demand.gpu_setting} or add GPU nodes"
            if no_gpus
            else f"lower {demand.to_lower}, or add nodes"
        )
        if node_groups is not None:
            room = [
                max_count if max_count < 0 else max_count * _fits(demand.shape, resources)
                for resources, max_count in node_groups
                if _fits(demand.shape, resources) > 0
            ]
            if any(r < 0 for r in room) or now + sum(room) >= demand.count:
                waiting.append(need)
                continue
            return f"{need}, and the autoscaler's node types add at most {sum(room)}: {fix}", True
        return f"{need}: {fix}", True
    return ("waiting for the autoscaler to add nodes: " + "; ".join(waiting) if waiting else None), False


def check_resources(cfg: Config, *, trainer: bool, tasks: bool) -> None:
    """Before any work: a trainer or a task that could never be placed would wait forever."""
    problem, fatal = placement_problem(cfg, *_cluster_shape(), trainer=trainer, tasks=tasks)
    if fatal:
        raise ConfigError(problem)
    if problem:
        print(f"[cluster] {problem}", flush=True)


# nccl for CUDA tensors and gloo for any CPU tensor: a collective on a CPU tensor under plain nccl crashes the run
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def process_group_backend(use_gpu: bool, cpu_fallback: bool) -> str:
    """gloo on CPUs; GPU_BACKEND with GPUs, if the GPU nodes have CUDA: GPUs declared to Ray on nodes without it
    get gloo and the workers compute on their CPUs where resources.cpu_fallback allows it. check_cuda asked the
    nodes alive before any work; this asks again where the trainer's GPUs are (a node the autoscaler added)."""
    if not use_gpu:
        return "gloo"
    if ray.get(steps.cuda_available.options(num_cpus=0, num_gpus=1).remote()):
        return GPU_BACKEND
    if not cpu_fallback:
        raise ConfigError(
            "resources.cpu_fallback: train.use_gpu asks for GPUs, and the GPU node the trainer got has "
            "no CUDA; fix its CUDA, set train.use_gpu=false, or set resources.cpu_fallback=true to "
            "train on its CPUs anyway"
        )
    print(
        "[train] WARNING: train.use_gpu, but CUDA is not available on the GPU nodes: training on their CPUs "
        "with gloo (resources.cpu_fallback)",
        flush=True,
    )
    return "gloo"


CUDA_PROBE_TIMEOUT_S = 120
PROBE_GPUS = 1e-4  # Ray's smallest unit: the probe fits beside whatever already holds the node's GPUs


def check_cuda(cfg: Config, *, trainer: bool) -> None:
    """Before any work: GPUs asked for (train.use_gpu by a command that trains, resources.task_gpus) on a node
    that declares GPUs to Ray but has no CUDA would compute for hours on its CPUs. Refused, unless
    resources.cpu_fallback allows it. Each GPU node alive now is asked, where its GPUs are."""
    if cfg.resources.cpu_fallback or not ((trainer and cfg.train.use_gpu) or cfg.resources.task_gpus):
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    probes = {
        steps.cuda_available.options(
            num_cpus=0,
            num_gpus=PROBE_GPUS,
            scheduling_strategy=(NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)),
        ).remote(): n
        for n in nodes
    }
    ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=CUDA_PROBE_TIMEOUT_S)
    without = [probes[ref] for ref in ready if not ray.get(ref)]
    if without:
        node = without[0]
        asked = [
            field
            for field, on in (
                ("train.use_gpu", trainer and cfg.train.use_gpu),
                (f"resources.task_gpus={cfg.resources.task_gpus:g}", cfg.resources.task_gpus),
            )
            if on
        ]
        raise ConfigError(
            f"resources.cpu_fallback: {' and '.join(asked)} ask{'s' * (len(asked) == 1)} for GPUs, and node "
            f"{node['NodeManagerAddress']} declares {node['Resources']['GPU']:g} to Ray but has no CUDA"
            f"{f' (and {len(without) - 1} more nodes)' if len(without) > 1 else ''}: its GPU work would "
            f"run on its CPUs; fix its CUDA, set train.use_gpu=false and resources.task_gpus=0, or "
            f"set resources.cpu_fallback=true to compute on the CPUs anyway"
        )


def _start_failure_limit(start_timeout_s: float) -> int:
    """Ray Train retries a worker group that did not get its resources within one start timeout;
    this many retries bound the whole wait by start_timeout_s."""
    attempt = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return max(0, math.ceil(start_timeout_s / attempt) - 1)


class _FailureLine(ray.train.UserCallback):
    """One console line per failure of the worker group, from Ray Train's controller: what failed and where
    training goes on from. The tracebacks (the surviving ranks' gloo errors, the controller's) stay in Ray's
    log files, and on the console with --verbose."""

    def __init__(self, max_failures: int, epoch: int | None):
        self.max_failures, self.failures, self.epoch = max_failures, 0, epoch

    def after_report(self, run_context, metrics: list[dict], checkpoint: Checkpoint | None) -> None:
        if checkpoint is not None:  # what a restarted worker group gets from ray.train.get_checkpoint()
            self.epoch = metrics[0]["epoch"]

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        # a rank whose process died surfaces as a failed health check wrapping ActorDiedError
        errors = {rank: getattr(e, "health_check_failure", e) for rank, e in sorted(worker_exceptions.items())}
        died = [rank for rank, e in errors.items() if isinstance(e, ActorDiedError)]
        what = "; ".join(
            [f"rank {rank}'s process died" for rank in died]
            if died
            else [f"rank {rank}: {type(e).__name__}: {first_line(e)[:120]}" for rank, e in errors.items()]
        )
        outcome = (
            f"no retries left (train.max_failures={self.max_failures})"
            if self.failures > self.max_failures
            else f"resuming from the epoch-{self.epoch} checkpoint"
            if self.epoch
            else "restarting from epoch 1"
        )
        say(f"[train] worker failure ({what}): {outcome}")


def fit(inputs: TrainInputs, storage_path: str, name: str, callbacks: list | None = None) -> Checkpoint:
    """Runs (or resumes, when `name` already has checkpoints under `storage_path`) the fine-tune.

    callbacks: Ray Train callbacks, e.g. Tune's TuneReportCallback when this runs inside a trial.
    """
    cfg = inputs.cfg.train
    newest = newest_checkpoint(join(storage_path, name))
    failure_line = _FailureLine(cfg.max_failures, len(read_history(join(newest, HISTORY_FILE))) if newest else None)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=replace(inputs, cfg=resolved(inputs.cfg, inputs.calibration), newest_on_disk=newest),
        torch_config=TorchConfig(backend=process_group_backend(cfg.use_gpu, inputs.cfg.resources.cpu_fallback)),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=worker_resources(cfg)
        ),
        run_config=RunConfig(
            storage_path=storage_path,
            name=name,
            callbacks=[*(callbacks or []), failure_line],
            # Ray Train's console logs (every rank's report, worker-group listings, a failed
            # rank's traceback: _FailureLine says it in one line) only on request; its log
            # files keep every level
            logging_config=LoggingConfig(log_level="INFO" if inputs.cfg.verbose else "CRITICAL"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=_start_failure_limit(cfg.start_timeout_s)
            ),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} produced no checkpoint")
    _prune_checkpoints(join(storage_path, name), cfg.keep_checkpoints)
    return result.checkpoint


def read_history(location: str) -> list[dict]:
    """The per-epoch metrics of a HISTORY_FILE."""
    return json.loads(read_bytes(location))
