"""L∞ attacks in pixel space [0, 1]. They always run in fp32: autocast can mask gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack

AUTOATTACK_MIN_CLASSES = 4  # its targeted DLR loss (APGD-T) ranks the top three wrong classes


def pgd(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
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


def cw_margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini–Wagner margin, mean over the batch: the best wrong logit minus the true one.
    PGD on it is the paper's "CW" attack under L∞."""
    true = logits.gather(1, labels[:, None])[:, 0]
    wrong = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return (wrong.amax(dim=1) - true).mean()


def apgd_ce(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    *,
    restarts: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """APGD on the cross-entropy (pyautoattack), under L∞: PGD whose step size adapts to the loss, so it
    needs no α and converges where a fixed-step PGD can stall. Each restart attacks only the images
    still classified correctly; an image it cannot fool is returned unchanged."""
    adversary = APGDAttack(
        classifier, n_iter=steps, norm="Linf", n_restarts=restarts, eps=eps, seed=seed, loss="ce", device=x.device
    )
    # pyautoattack seeds the global generators, CUDA's too; the caller's random state is left as it was
    with (
        torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []),
        torch.autocast(device_type=x.device.type, enabled=False),
    ):
        return adversary.perturb(x.detach().float(), y).detach()


def autoattack(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """AutoAttack (pyautoattack) under L∞: 'standard' (APGD-CE, APGD-T, FAB-T, Square; on fewer than
    AUTOATTACK_MIN_CLASSES classes the same without APGD-T) or 'rand' (APGD-CE and APGD-DLR with EOT, for
    randomised models). classifier maps pixels to logits."""
    with torch.no_grad():
        classes = classifier(x[:1].float()).shape[1]
    if classes >= AUTOATTACK_MIN_CLASSES:
        adversary = AutoAttack(classifier, eps=eps, version=version, device=x.device, seed=seed)
    elif version == "standard":  # e.g. PCAM's two classes
        adversary = AutoAttack(
            classifier, eps=eps, version="custom", attacks=["apgd-ce", "fab-t", "square"], device=x.device, seed=seed
        )
        adversary.apgd.n_restarts = adversary.fab.n_restarts = 1  # as the standard version sets them
    else:
        raise ValueError(
            f"AutoAttack's rand version needs the DLR loss, hence at least {AUTOATTACK_MIN_CLASSES} "
            f"classes; this task has {classes}"
        )
    targets = min(9, classes - 1)  # the standard 9 target classes need 10 classes
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_target_classes = targets
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_adv, _ = adversary.run_standard_evaluation(x.detach().float(), y, batch_size=batch_size)
    return x_adv.detach()


def forward_passes(attack: str, steps: int | None, restarts: int = 1) -> int:
    """An upper bound of the work an attack does per image, in forward passes (a backward counts as two), with
    the clean and final predictions: what shards are ordered by and `agft plan` predicts from. AutoAttack's
    stages stop on images already fooled, so on a non-robust model it does far less than this bound:
    APGD-CE 100 steps, APGD-T 9 targets × 100, FAB-T 9 × 100, Square 5 000 queries (forward only);
    the rand version 2 × 100 steps × 20 EOT draws."""
    gradient_step = 3
    if attack == "autoattack":
        return 2 + gradient_step * (100 + 9 * 100 + 9 * 100) + 5000
    if attack == "autoattack-rand":
        return 2 + gradient_step * 2 * 100 * 20
    return 2 + gradient_step * steps * restarts
