"""The calibrate stage's task: γ for calibration.gamma: auto."""

from __future__ import annotations

import ray
import torch

from agft_core.cache import embeddings_of, read_parquet
from agft_core.calibration import Calibration, fit_gamma


@ray.remote
def calibrate_gamma(*, teacher_files: list[str], text_files: list[str], inv_tau: float) -> Calibration:
    """The fit on the teacher cache of the training split and its class-prompt cache."""
    teacher = read_parquet(teacher_files)

    def column(name: str) -> torch.Tensor:
        return torch.from_numpy(teacher.column(name).to_numpy())

    return fit_gamma(
        torch.from_numpy(embeddings_of(teacher)),
        column("label"),
        column("index"),
        torch.from_numpy(embeddings_of(read_parquet(text_files))),
        inv_tau,
    )
