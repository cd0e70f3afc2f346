"""Contrastive pretraining of the embedded teacher on the world's captioned images."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from agft_core.data import to_pixels
from agft_core.model import ImageEncoder, create_clip

RECIPE = "clip-pretrain-v2"  # bump when pretrain_clip changes what it produces: invalidates cached teachers


def pretrain_clip(arch: str, images: np.ndarray, captions: list[str], *, epochs: int, batch_size: int, lr: float,
                  seed: int, on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """A randomly initialised `arch` whose image and text towers are trained together with
    open_clip's ClipLoss; the seed fixes the init and the data order. Returns it in eval mode."""
    torch.manual_seed(seed)
    model = create_clip(arch, None, init_seed=None)  # drawn from `seed`, set above
    tokens = open_clip.get_tokenizer(arch)(captions)
    pixels = to_pixels(images)
    encoder = ImageEncoder.from_clip(model)
    clip_loss = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    steps_per_epoch = len(pixels) // batch_size
    total, warmup = epochs * steps_per_epoch, max(1, epochs * steps_per_epoch // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / total))))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(pixels))
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            image_emb = encoder(pixels[idx])
            text_emb = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            loss = clip_loss(image_emb, text_emb, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
        if on_epoch:
            on_epoch(epoch, running / max(1, steps_per_epoch))
    return model.eval()
