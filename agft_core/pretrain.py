"""Contrastive pretraining of the embedded teacher on the world's captioned images."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from agft_core.data import to_pixels
from agft_core.model import ImageEncoder, create_clip
from agft_core.optim import warmup_cosine
from agft_core.precision import autocast

VERSION = "clip-pretrain-v3"  # bump when pretrain_clip changes what it produces: invalidates cached teachers


def native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_amp(amp: str) -> str:
    """pretrain.amp's "auto": bf16 on a CPU with native bf16, where it is faster than fp32; off elsewhere, where
    emulated bf16 pretrained 12x slower than fp32 (2026-12-07, an AMD EPYC without avx512_bf16)."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16() else "off"


def pretrain_clip(
    arch: str,
    images: np.ndarray,
    captions: list[str],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    amp: str = "auto",
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """A randomly initialised `arch` whose image and text towers are trained together, on the CPU, with
    open_clip's ClipLoss (in fp32, on the outputs of towers run under precision.autocast(amp)); the seed fixes the init
    and the data order. The lr warms up over the first 1/20 of the steps, then decays on a cosine. Returns it in
    eval mode."""
    amp = resolve_amp(amp)
    if amp == "bf16" and not native_bf16():
        warnings.warn(
            "pretrain.amp=bf16 on a CPU without native bf16 instructions is emulated and slow; "
            "pretrain.amp=off is faster here",
            stacklevel=2,
        )
    torch.manual_seed(seed)
    model = create_clip(arch, None, init_seed=None)  # drawn from `seed`, set above
    tokens = open_clip.get_tokenizer(arch)(captions)
    pixels = to_pixels(images)
    encoder = ImageEncoder.from_clip(model)
    clip_loss = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    steps_per_epoch = len(pixels) // batch_size
    total = epochs * steps_per_epoch
    schedule = warmup_cosine(optimizer, max(1, total // 20), total)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(pixels))
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            with autocast(amp, torch.device("cpu")):
                image_emb = encoder(pixels[idx])
                text_emb = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            loss = clip_loss(image_emb.float(), text_emb.float(), model.logit_scale.exp())
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
