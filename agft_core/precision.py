"""Number formats: the autocast the teacher's pretraining (pretrain.amp) and a zero-shot evaluation
(eval.precision) compute in; for an evaluation, what its forward passes, and so the attacks' gradients, are rounded
to."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast to bf16 or fp16 (any other name: off). On a CPU, attention also leaves the flash kernel for torch's
    math one: the CPU flash kernel's bf16 backward took 8x its fp32 time (bench/pretrain_recipe.py)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


@contextmanager
def tf32(precision: str) -> Iterator[None]:
    """CUDA's matrix products and convolutions in TF32 for precision "tf32", in full fp32 for any other, until the
    way out, where the process's flags are restored. torch reads the flags as each kernel starts, backward passes
    included: an attack's gradients follow them only if its backward runs inside this block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextmanager
def evaluation_precision(precision: str, device: torch.device) -> Iterator[None]:
    """fp32: TF32 off (the reported default); tf32: CUDA's matrix products and convolutions in TF32; bf16 and
    fp16: autocast."""
    with tf32(precision), autocast(precision, device):
        yield
