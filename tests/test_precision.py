"""eval.precision: the encoder computes in the format asked for, inside every attack too, and the process's TF32
flags come back as they were."""

import pytest
import torch

from agft_core.evaluate import zero_shot_counts
from agft_core.precision import evaluation_precision


class Encoder(torch.nn.Module):
    """A linear image encoder that records the dtype of every output its layer computed."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 8 * 8, 6)
        self.dtypes = []

    def forward(self, pixels):
        out = self.layer(pixels.flatten(1))
        self.dtypes.append(out.dtype)
        return out


def _images(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % 4)


def _evaluate(encoder, attack: str, precision: str) -> dict:
    """A 3-step attack's evaluation of 12 images on 4 classes."""
    text = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    return zero_shot_counts(
        encoder,
        text,
        10.0,
        _images(),
        eps=2 / 255,
        alpha=1 / 255,
        steps=3,
        batch_size=6,
        attack=attack,
        precision=precision,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce"])  # AutoAttack calls the same classifier, in 20 s
@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_every_forward_of_an_evaluation_runs_in_its_precision(attack, precision, dtype):
    torch.manual_seed(0)
    encoder = Encoder()
    counts = _evaluate(encoder, attack, precision)
    assert counts["n"] == 12
    # the clean pass, the attack's passes (which turn autocast off around themselves) and the final one
    assert len(encoder.dtypes) > 4 and set(encoder.dtypes) == {dtype}


def test_bf16_attacks_move_the_logits_and_fp32_is_bit_exact_to_a_plain_forward():
    torch.manual_seed(0)
    encoder, pixels = Encoder(), torch.rand(5, 3, 8, 8)
    plain = encoder(pixels)
    with evaluation_precision("fp32", pixels.device):
        assert torch.equal(encoder(pixels), plain)
    with evaluation_precision("bf16", pixels.device):
        rounded = encoder(pixels)
    assert not torch.equal(rounded.float(), plain)
    assert torch.allclose(rounded.float(), plain, atol=0.05)


class _RecordsTf32InBackward(torch.autograd.Function):
    """The identity, noting CUDA's TF32 matmul flag each time its backward runs."""

    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        _RecordsTf32InBackward.seen.append(torch.backends.cuda.matmul.allow_tf32)
        return grad


class _Tf32Probe(torch.nn.Module):
    def forward(self, x):
        return _RecordsTf32InBackward.apply(x)


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce"])
@pytest.mark.parametrize(("precision", "flag_outside"), [("tf32", False), ("fp32", True)])
def test_the_attacks_gradients_are_computed_in_the_evaluations_precision(attack, precision, flag_outside):
    """torch reads the TF32 flags when a kernel starts, the attack's backward passes included: they must run
    under the evaluation's flags (fp32: TF32 off, what every reported number used), not the process's."""
    torch.manual_seed(0)
    encoder = Encoder()
    encoder.layer = torch.nn.Sequential(_Tf32Probe(), encoder.layer)
    _RecordsTf32InBackward.seen = []
    torch.backends.cuda.matmul.allow_tf32 = flag_outside
    try:
        _evaluate(encoder, attack, precision)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert _RecordsTf32InBackward.seen and set(_RecordsTf32InBackward.seen) == {precision == "tf32"}


@pytest.mark.parametrize("before", [False, True])
def test_tf32_is_on_only_inside_a_tf32_evaluation_and_restored_after(before):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
    try:
        with evaluation_precision("tf32", torch.device("cpu")):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with evaluation_precision("fp32", torch.device("cpu")):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(KeyError), evaluation_precision("tf32", torch.device("cpu")):
            raise KeyError("an attack that fails")
        assert torch.backends.cuda.matmul.allow_tf32 is before and torch.backends.cudnn.allow_tf32 is before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
