import pytest
import torch

from agft_core import pretrain, world
from agft_core.catalog import EMBEDDED_ARCH
from agft_core.model import state_digest
from agft_core.precision import autocast
from agft_core.pretrain import pretrain_clip


def test_pretraining_is_reproducible_from_its_seed_and_learns():
    corpus = world.generate("corpus", "pretrain", 96, seed=0)
    losses = {0: [], 1: []}

    def run(seed):
        return pretrain_clip(
            EMBEDDED_ARCH,
            corpus.images,
            corpus.captions,
            epochs=3,
            batch_size=32,
            lr=2e-3,
            seed=seed,
            on_epoch=lambda e, loss: losses[seed].append(loss),
        )

    a, b = run(0), run(0)
    assert state_digest(a) == state_digest(b)
    assert state_digest(run(1)) != state_digest(a)
    assert losses[0][2] < losses[0][0]


def test_bf16_autocast_multiplies_in_bf16_and_keeps_attention_off_the_flash_kernel():
    layer, x = torch.nn.Linear(8, 8), torch.randn(4, 8)
    with autocast("bf16", torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16
        # torch.backends.cuda's flags select the SDPA kernel on the CPU too
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    with autocast("off", torch.device("cpu")):
        assert layer(x).dtype == torch.float32


def test_pretraining_precision_changes_the_teacher_and_emulated_bf16_is_a_warning(monkeypatch, recwarn):
    corpus = world.generate("corpus", "pretrain", 64, seed=0)

    def run(amp):
        return pretrain_clip(
            EMBEDDED_ARCH, corpus.images, corpus.captions, epochs=1, batch_size=32, lr=2e-3, seed=0, amp=amp
        )

    fp32 = state_digest(run("off"))
    monkeypatch.setattr(pretrain, "native_bf16", lambda: False)
    assert state_digest(run("auto")) == fp32  # auto, without native bf16: fp32, and no warning
    with pytest.warns(UserWarning, match="pretrain.amp=off is faster here"):
        bf16 = state_digest(run("bf16"))
    assert bf16 != fp32
    monkeypatch.setattr(pretrain, "native_bf16", lambda: True)
    assert state_digest(run("auto")) == bf16
    run("off")
    assert not [w for w in recwarn if "pretrain.amp" in str(w.message)]
