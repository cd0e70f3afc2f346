"""What every Ray task shares: the model it loads, the CPUs and device it computes on, and its timeline record."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ray
import torch


@dataclass(frozen=True)
class ModelSource:
    """The CLIP a task loads: its open_clip architecture, its weights (None: a random init) and its input size."""

    arch: str
    weights: str | None
    image_size: int


def use_assigned_cpus() -> None:
    # Ray sets OMP_NUM_THREADS=1 in workers; give torch the CPUs this task was granted.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


def say(line: str, stream=sys.stdout) -> None:
    """One line on the worker's console, which Ray forwards to the driver's. Not print(): in a Ray Train
    worker print goes through Train's logger and a job's log shows the line twice."""
    stream.write(line + "\n")
    stream.flush()


def cpu_fallback(step: str, device: torch.device) -> torch.device:
    """`device` if it can run here; a CUDA device Ray granted on a node without CUDA (a GPU declared
    with `ray start --num-gpus` on a CPU machine, or a driver mismatch) falls back to the CPU, saying so."""
    if device.type != "cuda" or torch.cuda.is_available():
        return device
    say(
        f"[{step}] WARNING: Ray granted GPU {ray.get_gpu_ids()} but CUDA is not available on node "
        f"{ray.get_runtime_context().get_node_id()[:12]}: computing on the CPU",
        sys.stderr,
    )
    return torch.device("cpu")


def task_device(step: str) -> torch.device:
    """Where a Ray task computes: the GPU Ray granted it (CUDA_VISIBLE_DEVICES names only that one), else the CPU."""
    return cpu_fallback(step, torch.device("cuda" if ray.get_gpu_ids() else "cpu"))


def ran_since(start: float) -> dict:
    """When and where a task ran, for the run's timeline: its start (time.time()), its end, its node."""
    return {"start": start, "end": time.time(), "node": ray.get_runtime_context().get_node_id()}
