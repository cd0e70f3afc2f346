import math

import pytest
import torch
import torch.nn.functional as F

from agft_core.losses import agft_loss, calibrated_targets, soft_cross_entropy, tecoa_loss


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.fixture
def emb():
    return _unit(5, 8, seed=0), _unit(5, 8, seed=1), _unit(4, 8, seed=2)  # student, teacher, text


def test_agft_loss_matches_hand_computed_soft_cross_entropy(emb):
    student, teacher, text = emb
    gamma, inv_tau = 0.4, 180.0
    expected = 0.0
    for i in range(5):
        t_logits = [gamma * inv_tau * float(teacher[i] @ text[j]) for j in range(4)]
        s_logits = [inv_tau * float(student[i] @ text[j]) for j in range(4)]
        t_max, s_max = max(t_logits), max(s_logits)
        t_z = sum(math.exp(v - t_max) for v in t_logits)
        s_lse = s_max + math.log(sum(math.exp(v - s_max) for v in s_logits))
        expected += -sum(math.exp(t - t_max) / t_z * (s - s_lse) for t, s in zip(t_logits, s_logits))
    expected /= 5
    got = agft_loss(student, calibrated_targets(teacher, text, gamma, inv_tau), text, inv_tau)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_agft_loss_is_kl_plus_teacher_entropy(emb):
    student, teacher, text = emb
    p = calibrated_targets(teacher, text, 0.4, 180.0)
    log_q = F.log_softmax(180.0 * student @ text.T, dim=-1)
    kl = F.kl_div(log_q, p, reduction="batchmean")
    entropy = -(p * p.log()).sum(-1).mean()
    assert agft_loss(student, p, text, 180.0).item() == pytest.approx((kl + entropy).item(), rel=1e-9)


def test_gamma_one_inv_tau_100_is_plain_self_distillation(emb):
    _, teacher, text = emb
    targets = calibrated_targets(teacher, text, 1.0, 100.0)
    assert torch.allclose(targets, F.softmax(100.0 * teacher @ text.T, dim=-1))
    # A student equal to the teacher is the optimum: loss = teacher entropy, zero gradient.
    student = teacher.clone().requires_grad_(True)
    loss = agft_loss(student, targets, text, 100.0)
    entropy = -(targets * targets.log()).sum(-1).mean()
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-9)
    assert grad.abs().max().item() < 1e-12


def test_gamma_below_one_softens_the_teacher(emb):
    _, teacher, text = emb
    sharp, soft = calibrated_targets(teacher, text, 1.0, 180.0), calibrated_targets(teacher, text, 0.4, 180.0)

    def entropy(p):
        return -(p * p.log()).sum(-1)

    assert torch.all(entropy(soft) > entropy(sharp))
    assert torch.equal(soft.argmax(-1), sharp.argmax(-1))


def test_tecoa_is_cross_entropy_at_the_logit_scale(emb):
    student, _, text = emb
    labels = torch.tensor([0, 1, 2, 3, 0])
    logits = 100.0 * student @ text.T
    expected = sum(-(logits[i, labels[i]] - torch.logsumexp(logits[i], 0)) for i in range(5)) / 5
    assert tecoa_loss(student, labels, text, 100.0).item() == pytest.approx(expected.item(), rel=1e-9)


def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    assert soft_cross_entropy(logits, F.one_hot(labels, 3).float()).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6
    )


def test_zero_shot_heads_stay_fp32_under_autocast():
    """The paper's 1/τ = 180 sharpens logits until bf16 rounding reshapes p_cal; the heads must not
    follow autocast (a training step runs them inside it)."""
    torch.manual_seed(0)
    teacher, student = F.normalize(torch.randn(32, 64), dim=-1), F.normalize(torch.randn(32, 64), dim=-1)
    text, labels = F.normalize(torch.randn(10, 64), dim=-1), torch.randint(0, 10, (32,))

    def heads():
        targets = calibrated_targets(teacher, text, 0.4, 180.0)
        return targets, agft_loss(student, targets, text, 180.0), tecoa_loss(student, labels, text, 100.0)

    reference = heads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = heads()
    for expected, got in zip(reference, under_autocast):
        assert got.dtype == torch.float32 and torch.equal(got, expected)
