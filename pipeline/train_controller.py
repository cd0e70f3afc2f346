"""What Ray Train's controller, a process of its own, unpickles: the function each worker runs and a callback that
says each failure of the worker group in one line. This module imports no torch, open_clip or MLflow, and the
workers' inputs reach it as an object ref, so the controller starts in a moment instead of importing the
training code (4-5 s of CPU per fine-tune)."""

from __future__ import annotations

import sys

import ray
import ray.train
from ray.exceptions import ActorDiedError
from ray.train import Checkpoint

from agft_core.errors import first_line


def run_worker(inputs: ray.ObjectRef) -> None:
    """Each worker's entry: the training code is imported here, in the worker, not where this is unpickled."""
    from pipeline.train import train_loop

    train_loop(ray.get(inputs))


class FailureLine(ray.train.UserCallback):
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
        if died:
            what = "; ".join(f"rank {rank}'s process died" for rank in died)
        else:
            what = "; ".join(f"rank {rank}: {type(e).__name__}: {first_line(e)[:120]}" for rank, e in errors.items())
        if self.failures > self.max_failures:
            outcome = f"no retries left (train.max_failures={self.max_failures})"
        elif self.epoch:
            outcome = f"resuming from the epoch-{self.epoch} checkpoint"
        else:
            outcome = "restarting from epoch 1"
        # not print(): the controller's print goes through Ray Train's logger, and a job's log would show it twice
        sys.stdout.write(f"[train] worker failure ({what}): {outcome}\n")
        sys.stdout.flush()
