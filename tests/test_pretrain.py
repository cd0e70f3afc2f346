from agft_core import world
from agft_core.catalog import EMBEDDED_ARCH
from agft_core.model import state_digest
from agft_core.pretrain import pretrain_clip


def test_pretraining_is_reproducible_from_its_seed_and_learns():
    corpus = world.generate("corpus", "pretrain", 96, seed=0)
    losses = {0: [], 1: []}
    run = lambda seed: pretrain_clip(EMBEDDED_ARCH, corpus.images, corpus.captions, epochs=3, batch_size=32,
                                     lr=2e-3, seed=seed, on_epoch=lambda e, loss: losses[seed].append(loss))
    a, b = run(0), run(0)
    assert state_digest(a) == state_digest(b)
    assert state_digest(run(1)) != state_digest(a)
    assert losses[0][2] < losses[0][0]
