"""The learning-rate schedule of the fine-tune and of the teacher's pretraining, from torch's own schedulers, and
the fine-tune's gradient all-reduce, from torch's DDP communication hooks."""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
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


GRADIENT_HOOKS = {"bf16": default_hooks.bf16_compress_hook}


def compress_gradients(model: torch.nn.Module, compression: str) -> bool:
    """Has DDP all-reduce `model`'s gradients in bf16 (half the bytes of fp32, rounded to 8 bits of mantissa)
    when compression is "bf16"; "off" leaves fp32. Whether a hook was registered: a model that is not wrapped in
    DDP (one worker) exchanges no gradients."""
    if compression == "off" or not isinstance(model, DistributedDataParallel):
        return False
    model.register_comm_hook(None, GRADIENT_HOOKS[compression])
    return True
