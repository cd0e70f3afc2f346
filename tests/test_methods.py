"""The baselines' losses against values computed by hand, and every method's training step."""

import math

import pytest
import torch
import torch.nn.functional as F

from agft_core.attacks import pgd
from agft_core.catalog import METHODS
from agft_core.losses import attention_map, fare_loss, kl_divergence, pmg_aft_loss, tga_zsr_loss
from agft_core.methods import adversarial_step, build_method
from agft_core.model import ImageEncoder, create_clip, logit_scale
from pipeline.config.sections import AttackConfig


def _log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _kl(p_logits, q_logits):
    log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


ADV = [[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]]
ORIG = [[1.0, 0.0, 0.0], [-0.5, 1.5, 0.2]]
CLEAN = [[0.0, 2.0, 1.0], [0.7, 0.7, 0.1]]
LABELS = [0, 1]


def test_kl_divergence_by_hand():
    expected = (_kl(ORIG[0], ADV[0]) + _kl(ORIG[1], ADV[1])) / 2
    got = kl_divergence(torch.tensor(ORIG, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def _t(v):
    return torch.tensor(v, dtype=torch.float64)


def test_pmg_aft_loss_by_hand_and_as_its_authors_code_writes_it():
    """KL(other ‖ adv) summed over the batch, by hand; and as the authors' final PMG_AFT.py writes it:
    nn.KLDivLoss(reduction="sum") of the adversarial log-probabilities against the other model's probabilities."""
    alpha, beta = 0.7, 1.3
    ce = -sum(_log_softmax(ADV[i])[LABELS[i]] for i in range(2)) / 2
    to_orig, to_clean = sum(_kl(ORIG[i], ADV[i]) for i in range(2)), sum(_kl(CLEAN[i], ADV[i]) for i in range(2))
    expected = ce + alpha * to_orig + beta * to_clean
    got = pmg_aft_loss(_t(ADV), _t(ORIG), _t(CLEAN), torch.tensor(LABELS), alpha, beta)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    kl_sum, adv_log_probs = torch.nn.KLDivLoss(reduction="sum"), F.log_softmax(_t(ADV), dim=1)
    authors = (
        F.cross_entropy(_t(ADV), torch.tensor(LABELS))
        + alpha * kl_sum(adv_log_probs, F.softmax(_t(ORIG), dim=1))
        + beta * kl_sum(adv_log_probs, F.softmax(_t(CLEAN), dim=1))
    )
    assert got.item() == pytest.approx(authors.item(), rel=1e-12)


@pytest.mark.parametrize("method, scale", [("pmg_aft", 1.0), ("pmg_aft_scaled", 100.0)])
def test_pmg_aft_attacks_on_the_logits_it_trains_on(method, scale):
    """The authors' attack_pgd maximises the CE of the cosine logits, unscaled, like their loss; the scaled form
    attacks at the model's logit scale."""
    torch.manual_seed(0)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    linear = torch.nn.Linear(12, 8)

    def student(z):  # an encoder's output is L2-normalised, as ImageEncoder's is
        return F.normalize(linear(z), dim=-1)

    adapted = build_method(method, text, 100.0, gamma=1.0, inv_tau=1.0, teacher=torch.nn.Linear(12, 8))
    z, labels = torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    expected = F.cross_entropy(scale * student(z) @ text.T, labels)
    assert adapted.attack_loss(student, z, labels, None).item() == pytest.approx(expected.item(), rel=1e-6)


def test_pmg_aft_scaled_form_by_hand():
    alpha, beta = 0.7, 1.3
    ce = -sum(_log_softmax(ADV[i])[LABELS[i]] for i in range(2)) / 2
    expected = (
        ce
        + alpha * sum(_kl(ORIG[i], ADV[i]) for i in range(2)) / 2
        + beta * sum(_kl(CLEAN[i], ADV[i]) for i in range(2)) / 2
    )
    got = pmg_aft_loss(_t(ADV), _t(ORIG), _t(CLEAN), torch.tensor(LABELS), alpha, beta, form="scaled")
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_fare_loss_is_the_summed_squared_distance_averaged_over_the_batch():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    assert fare_loss(student, teacher).item() == pytest.approx(((0 + 4 + 4) + (1 + 1 + 0)) / 2)


def test_attention_map_is_min_max_normalised_similarity_upsampled():
    text = torch.tensor([[1.0, 0.0]])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0]]])  # sims 1, 0, .5, -1
    maps = attention_map(tokens, text, image_size=2)  # 2x2 grid, no upsampling
    assert maps.tolist() == [[[1.0, 0.5], [0.75, 0.0]]]
    assert attention_map(tokens, text, image_size=8).shape == (1, 8, 8)


def test_tga_zsr_weights_alpha_on_the_adversarial_term_and_beta_on_the_clean_one():
    logits, labels = torch.tensor(ADV, dtype=torch.float64), torch.tensor(LABELS)
    ce = F.cross_entropy(logits, labels).item()
    orig = torch.zeros(2, 2, 2, dtype=torch.float64)
    adv = orig.clone()
    adv[:, 0, 0] = 3.0
    adv[:, 1, 1] = 4.0  # flattened L2 norm 5 per image; a per-pixel norm would give 7
    clean = orig.clone()
    clean[:, 0, 1] = 1.0
    got = tga_zsr_loss(logits, labels, adv, clean, orig, alpha=0.08, beta=0.05).item()
    assert got == pytest.approx(ce + 0.08 * 5.0 + 0.05 * 1.0, rel=1e-12)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    clip = create_clip("agft-tiny-vit", None)
    text = F.normalize(torch.randn(4, 128), dim=-1)
    return clip, text, logit_scale(clip)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_attacks_inside_the_ball_and_its_step_lowers_its_loss(tiny, name):
    clip, text, scale = tiny
    student = ImageEncoder.from_clip(
        create_clip("agft-tiny-vit", None, init_seed=1)
    )  # another init: FARE's loss is not 0
    frozen = ImageEncoder.from_clip(clip).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.arange(8) % 4
    with torch.no_grad():
        cached = frozen(x)
    method = build_method(name, text, scale, gamma=0.4, inv_tau=30.0, teacher=frozen, alpha=0.5, beta=0.5)
    # With ε = 0 the adversarial image is x itself, so each call's loss is the same objective at
    # the parameters after one more update: gradient descent must lower it.
    no_attack = AttackConfig(eps=0.0, alpha=0.0, steps=0)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [
        adversarial_step(
            student,
            student,
            method,
            x,
            y,
            cached_teacher=cached,
            attack=no_attack,
            amp="off",
            optimizer=optimizer,
            scaler=scaler,
        )[0].item()
        for _ in range(3)
    ]
    assert all(math.isfinite(v) for v in losses)
    assert losses[2] < losses[1] < losses[0], losses
    state = method.prepare(x, y, cached)
    x_adv = pgd(lambda z: method.attack_loss(student, z, y, state), x, 4 / 255, 2 / 255, 3)
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert method.attack_loss(student, x_adv, y, state) > method.attack_loss(student, x, y, state)


def test_methods_that_need_the_frozen_encoder_say_so(tiny):
    _, text, scale = tiny
    with pytest.raises(ValueError, match="fare needs the frozen teacher"):
        build_method("fare", text, scale, gamma=0.4, inv_tau=30.0)


def test_validation_adds_counts_and_a_worker_with_no_validation_image_adds_zeros():
    """16 workers, 8 validation images: ranks 8-15 hold none and must add nothing rather than divide by zero; the
    others add their images' counts, which the epoch sums over the workers before it divides."""
    from torch.utils.data import Subset, TensorDataset

    from pipeline.config.loading import load_config
    from pipeline.train import Totals, Trainee, validate

    torch.manual_seed(0)
    encoder = ImageEncoder(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)), [0.5] * 3, [0.25] * 3, 8
    )
    text = F.normalize(torch.randn(3, 4), dim=-1)
    method = build_method("tecoa", text, 100.0, gamma=1.0, inv_tau=100.0)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    trainee = Trainee(encoder, encoder, method, optimizer, None, None, text, None)
    images = TensorDataset(torch.rand(8, 3, 8, 8), torch.arange(8) % 3)
    cfg = load_config(None, ["train.validation.attack.eps=0"])  # an ε of 0: robust equals clean

    def added(rank: int) -> tuple[float, float, float]:
        totals = Totals(torch.device("cpu"))
        validate(trainee, cfg, Subset(images, range(rank, len(images), 16)), text, rank, totals)
        return totals["val_images"], totals["val_clean_correct"], totals["val_robust_correct"]

    x, y = images[2]
    correct = float((encoder(x[None]) @ text.T).argmax(-1).item() == y)
    assert added(2) == (1, correct, correct)
    assert added(9) == (0, 0, 0)
