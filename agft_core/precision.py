"""The number format a zero-shot evaluation computes in (eval.precision): what its forward passes, and so the
attacks' gradients, are rounded to."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def evaluation_precision(precision: str, device: torch.device) -> Iterator[None]:
    """fp32: TF32 off (the reported default); tf32: CUDA's matrix products and convolutions in TF32; bf16 and
    fp16: autocast. The process's TF32 flags are restored on the way out."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        dtype = AUTOCAST_DTYPES.get(precision)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
