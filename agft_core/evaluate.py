"""Zero-shot evaluation: clean and PGD robust top-1 accuracy, and teacher embeddings for the cache."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from agft_core.attacks import pgd


def batches(images: Dataset, batch_size: int, indices=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    subset = images if indices is None else Subset(images, list(indices))
    yield from DataLoader(subset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def embed_images(encoder: nn.Module, images: Dataset, indices: range, batch_size: int, device="cpu"):
    """(labels [n], embeddings [n, dim]) for images[indices], in order."""
    labels, embeddings = [], []
    for x, y in batches(images, batch_size, indices):
        embeddings.append(encoder(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(labels), torch.cat(embeddings)


def zero_shot_accuracy(encoder: nn.Module, text_emb: torch.Tensor, scale: float, images: Dataset, *,
                       eps: float, alpha: float, steps: int, batch_size: int, device="cpu",
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """Top-1 accuracy on clean images and under PGD on hard-label cross-entropy at `scale`.

    An image counts as robust only if it is classified correctly both clean and attacked:
    the attacker may always leave the image alone, so robust accuracy never exceeds clean.
    """
    encoder = encoder.float().eval()
    text_emb = text_emb.to(device).float()
    clean = robust = total = 0
    for x, y in batches(images, batch_size):
        x, y = x.to(device).float(), y.to(device)
        with torch.no_grad():
            clean_ok = (encoder(x) @ text_emb.T).argmax(-1) == y
        x_adv = pgd(lambda z: F.cross_entropy(scale * encoder(z) @ text_emb.T, y), x, eps, alpha, steps,
                    generator=generator)
        with torch.no_grad():
            adv_ok = (encoder(x_adv) @ text_emb.T).argmax(-1) == y
        clean += int(clean_ok.sum())
        robust += int((clean_ok & adv_ok).sum())
        total += len(y)
    return {"clean": clean / total, "robust": robust / total, "n": total}
