"""Zero-shot evaluation: clean and PGD robust top-1 accuracy, and teacher embeddings for the cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from agft_core.attacks import apgd_ce, autoattack, cw_margin_loss, pgd
from agft_core.catalog import FIXED_STEP_ATTACKS, ROBUST_DEFINITIONS
from agft_core.losses import zero_shot_logits
from agft_core.precision import evaluation_precision, tf32


def batches(
    images: Dataset, batch_size: int, indices=None, device="cpu", loader_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, labels) on `device`, in order; loader_workers processes decode while the model runs."""
    subset = images if indices is None else Subset(images, list(indices))
    device = torch.device(device)
    loader = DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=loader_workers, pin_memory=device.type == "cuda"
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def embed_images(
    encoder: nn.Module, images: Dataset, indices: range, batch_size: int, device="cpu", loader_workers: int = 0
):
    """(labels [n], embeddings [n, dim]) for images[indices], in order, on the CPU."""
    labels, embeddings = [], []
    for x, y in batches(images, batch_size, indices, device, loader_workers):
        embeddings.append(encoder(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(labels), torch.cat(embeddings)


class ZeroShotClassifier(nn.Module):
    """Pixels to zero-shot logits at the model's own scale: what AutoAttack needs. The encoder runs in
    `precision` (agft_core.precision), also inside the attacks, which turn autocast off around themselves."""

    def __init__(self, encoder: nn.Module, text_emb: torch.Tensor, scale: float, precision: str = "fp32"):
        super().__init__()
        self.encoder, self.scale, self.precision = encoder, scale, precision
        self.register_buffer("text", text_emb, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with evaluation_precision(self.precision, pixels.device):
            embeddings = self.encoder(pixels)
        return zero_shot_logits(embeddings, self.text, self.scale)


def zero_shot_accuracy(encoder: nn.Module, text_emb: torch.Tensor, scale: float, images: Dataset, **attack) -> dict:
    """zero_shot_counts as fractions of the images scored, and their number "n"."""
    counts = zero_shot_counts(encoder, text_emb, scale, images, **attack)
    return {name: count / counts["n"] for name, count in counts.items() if name != "n"} | {"n": counts["n"]}


def zero_shot_counts(
    encoder: nn.Module,
    text_emb: torch.Tensor,
    scale: float,
    images: Dataset,
    *,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int,
    device="cpu",
    generator: torch.Generator | None = None,
    attack: str = "pgd",
    restarts: int = 1,
    loader_workers: int = 0,
    indices: range | None = None,
    precision: str = "fp32",
) -> dict[str, int]:
    """How many images (of images[indices], default all) are classified correctly clean and under an L∞ attack at
    the model's logit scale: pgd (hard-label cross-entropy), cw (PGD on the margin loss), apgd-ce (steps
    iterations and restarts, no α), autoattack or autoattack-rand, the encoder computing in `precision`; "n": how
    many were scored.

    Robust counts under both definitions in use: "attacked", the paper's (the attacked image is classified
    correctly), and "clean_and_attacked" (the clean one is too). Counts, not fractions, so that shards of a
    dataset add up exactly.
    """
    classifier = ZeroShotClassifier(encoder.float().eval(), text_emb.to(device).float(), scale, precision)
    counts = dict.fromkeys(("clean", *ROBUST_DEFINITIONS), 0)
    total = 0
    with tf32(precision):  # the attacks' backward passes too, not only the classifier's forwards
        for x, y in batches(images, batch_size, indices, device=device, loader_workers=loader_workers):
            x = x.float()
            with torch.no_grad():
                clean_ok = classifier(x).argmax(-1) == y
            if attack in FIXED_STEP_ATTACKS:
                loss = F.cross_entropy if attack == "pgd" else cw_margin_loss
                x_adv = pgd(
                    lambda z: loss(classifier(z), y),  # noqa: B023 - pgd calls it within this iteration
                    x,
                    eps,
                    alpha,
                    steps,
                    generator=generator,
                )
            else:
                seed = int(
                    torch.randint(
                        0, 2**31, (1,), generator=generator, device=generator.device if generator is not None else "cpu"
                    )
                )
                x_adv = (
                    apgd_ce(classifier, x, y, eps, steps, restarts=restarts, seed=seed)
                    if attack == "apgd-ce"
                    else autoattack(
                        classifier,
                        x,
                        y,
                        eps,
                        version=attack.partition("-")[2] or "standard",
                        seed=seed,
                        batch_size=batch_size,
                    )
                )
            with torch.no_grad():
                adv_ok = classifier(x_adv).argmax(-1) == y
            for name, ok in robust_outcomes(clean_ok, adv_ok).items():
                counts[name] += int(ok.sum())
            total += len(y)
    return counts | {"n": total}


def robust_outcomes(clean_ok: torch.Tensor, adv_ok: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: correct clean, and robust under each of ROBUST_DEFINITIONS."""
    return {"clean": clean_ok, "attacked": adv_ok, "clean_and_attacked": clean_ok & adv_ok}
