"""L∞ attacks in pixel space [0, 1]. They always run in fp32: autocast can mask gradients."""
from __future__ import annotations

from typing import Callable

import torch


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, alpha: float,
        steps: int, random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on loss_fn inside the ε-ball around x, clamped to [0, 1].

    loss_fn maps a batch of images to a scalar loss; the returned images are detached.
    """
    x = x.detach().float()
    delta = torch.zeros_like(x)
    if random_start and eps > 0:
        delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    x_adv = (x + delta).clamp(0, 1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
