"""The driver's side of the fine-tune: fit() runs (or resumes) pipeline.train's loop on a Ray Train
TorchTrainer, with the process group's backend checked against the nodes, failures said in one line each, and
only the newest checkpoints kept. The finetune stage and every sweep trial call it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.constants import DEFAULT_WORKER_GROUP_START_TIMEOUT_S, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

from agft_core.cache import join, read_bytes
from pipeline.checkpoints import HISTORY_FILE, newest_checkpoint, prune
from pipeline.cluster import alive_nodes, streaming_plan, worker_resources
from pipeline.config.sections import ConfigError
from pipeline.ingest import STREAMED
from pipeline.stages.calibrate import resolved
from pipeline.train import TrainInputs
from pipeline.train_controller import FailureLine, run_worker
from tasks.describe import cuda_available
from tasks.streaming import decoded_images

# nccl for CUDA tensors and gloo for any CPU tensor: a collective on a CPU tensor under plain nccl crashes the run
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def fit(inputs: TrainInputs, storage_path: str, name: str, callbacks: list | None = None) -> Checkpoint:
    """Runs (or resumes, when `name` already has checkpoints under `storage_path`) the fine-tune.

    callbacks: Ray Train callbacks, e.g. Tune's TuneReportCallback when this runs inside a trial.
    """
    cfg = inputs.cfg.train
    newest = newest_checkpoint(join(storage_path, name))
    failure_line = FailureLine(cfg.max_failures, len(read_history(join(newest, HISTORY_FILE))) if newest else None)
    trainer = TorchTrainer(
        run_worker,
        datasets={STREAMED: _training_stream(inputs)} if inputs.cfg.data.decode == "ray_data" else None,
        train_loop_config=ray.put(replace(inputs, cfg=resolved(inputs.cfg, inputs.calibration), newest_on_disk=newest)),
        torch_config=TorchConfig(backend=process_group_backend(cfg.use_gpu, inputs.cfg.resources.cpu_fallback)),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=worker_resources(cfg)
        ),
        run_config=RunConfig(
            storage_path=storage_path,
            name=name,
            callbacks=[*(callbacks or []), failure_line],
            # Ray Train's console logs (every rank's report, worker-group listings, a failed
            # rank's traceback: FailureLine says it in one line) only on request; its log
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
    prune(join(storage_path, name), cfg.keep_checkpoints)
    return result.checkpoint


def _training_stream(inputs: TrainInputs) -> ray.data.Dataset:
    """data.train as a Ray Data stream of decoded images in one shuffled order, for the workers to split."""
    cfg = inputs.cfg
    plan = streaming_plan(cfg, alive_nodes(), cfg.train.batch_size)
    return decoded_images(
        inputs.train_spec, inputs.teacher.image_size, inputs.train_images, plan, shuffle_seed=cfg.seed
    )


def read_history(location: str) -> list[dict]:
    """The per-epoch metrics of a HISTORY_FILE."""
    return json.loads(read_bytes(location))


def process_group_backend(use_gpu: bool, cpu_fallback: bool) -> str:
    """gloo on CPUs; GPU_BACKEND with GPUs, if the GPU nodes have CUDA: GPUs declared to Ray on nodes without it
    get gloo and the workers compute on their CPUs where resources.cpu_fallback allows it. check_cuda asked the
    nodes alive before any work; this asks again where the trainer's GPUs are (a node the autoscaler added)."""
    if not use_gpu:
        return "gloo"
    if ray.get(cuda_available.options(num_cpus=0, num_gpus=1).remote()):
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


def _start_failure_limit(start_timeout_s: float) -> int:
    """Ray Train retries a worker group that did not get its resources within one start timeout;
    this many retries bound the whole wait by start_timeout_s."""
    attempt = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return max(0, math.ceil(start_timeout_s / attempt) - 1)
