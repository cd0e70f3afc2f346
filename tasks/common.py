from __future__ import annotations

import ray
import torch


def use_assigned_cpus() -> None:
    # Ray sets OMP_NUM_THREADS=1 in workers; give torch the CPUs this task was granted.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
