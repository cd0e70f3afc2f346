"""The learning-rate schedule of the fine-tune and of the teacher's pretraining, from torch's own schedulers."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LRScheduler:
    """Linear warm-up over the first `warmup` steps (step s at (s + 1) / warmup of the lr), then a cosine
    decay to zero at step `total`; no warm-up for warmup 0. Stepped once per optimizer step; its
    state_dict resumes it."""
    warmup = min(warmup, total)
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=max(1, total))
    return SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, 1 / warmup, 1.0, total_iters=max(1, warmup - 1)),
            CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
        ],
        milestones=[warmup],
    )
