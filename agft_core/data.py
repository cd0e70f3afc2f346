"""Datasets as the method sees them: images in [0, 1], labels, class names and prompt templates."""

from __future__ import annotations

import numpy as np
import torch


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] to float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
