"""calibration.gamma: auto - temperature scaling of the teacher, checked on embeddings whose best
temperature is known: labels drawn from softmax(s · cos(x, t)) make s the likelihood's maximiser."""

import math

import pytest
import torch
import torch.nn.functional as F

from agft_core.calibration import fit_gamma
from pipeline.config.loading import load_config
from pipeline.config.sections import ConfigError
from pipeline.stages.calibrate import resolved

INV_TAU = 30.0


def _synthetic(true_scale: float, n: int = 20000, classes: int = 10, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    images = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    labels = torch.multinomial(torch.softmax(true_scale * images @ text.T, dim=-1), 1, generator=g)[:, 0]
    return images, labels, torch.arange(n), text


@pytest.mark.parametrize("true_scale", [12.0, 24.0])
def test_auto_recovers_the_temperature_the_labels_were_drawn_at(true_scale):
    fitted = fit_gamma(*_synthetic(true_scale), INV_TAU)
    assert fitted.gamma * INV_TAU == pytest.approx(true_scale, rel=0.05)
    assert fitted.unclipped_gamma == fitted.gamma


def test_auto_clips_gamma_to_one_and_reports_how_far_the_teacher_would_sharpen():
    fitted = fit_gamma(*_synthetic(45.0), INV_TAU)
    assert fitted.gamma == 1.0
    assert fitted.unclipped_gamma * INV_TAU == pytest.approx(45.0, rel=0.05)


def test_auto_minimises_the_nll_computed_independently_on_the_held_out_fifth():
    images, labels, index, text = _synthetic(12.0, n=5000)
    fitted = fit_gamma(images, labels, index, text, INV_TAU)
    part = index % 5 == 0

    def nll(gamma):  # by hand: −log p(y), p from an explicit exp/sum
        logits = gamma * INV_TAU * (images[part].double() @ text.double().T)
        p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
        return -p[torch.arange(int(part.sum())), labels[part]].log().mean().item()

    assert fitted.nll == pytest.approx(nll(fitted.gamma), rel=1e-9)
    for step in (0.9, 1.1):
        assert nll(fitted.gamma) < nll(fitted.gamma * step)
    # the curve it logs is the same function, on the fitted part and on the other four fifths
    g = fitted.curve["gamma"][10]
    assert fitted.curve["nll_fit"][10] == pytest.approx(nll(g), rel=1e-9)
    assert math.isfinite(fitted.curve["nll_rest"][10]) and fitted.curve["nll_rest"][10] != fitted.curve["nll_fit"][10]


def test_a_trial_at_another_inv_tau_gets_the_same_fitted_scale():
    """A sweep over 1/τ with gamma: auto: each trial's γ keeps the teacher's fitted logit scale γ/τ."""
    fitted = fit_gamma(*_synthetic(12.0, n=3000), INV_TAU)
    for inv_tau, expected_gamma in ((60.0, fitted.scale / 60.0), (8.0, 1.0)):  # at 1/τ = 8 the scale needs γ > 1
        cfg = resolved(load_config(None, ["calibration.gamma=auto", f"calibration.inv_tau={inv_tau}"]), fitted)
        assert cfg.calibration.gamma == pytest.approx(expected_gamma)
    fixed = load_config(None, ["calibration.gamma=0.7"])
    assert resolved(fixed, fitted) is fixed  # a number (a sweep axis's value) is kept
    with pytest.raises(ConfigError, match="calibration.gamma: auto needs the fit"):
        resolved(load_config(None, ["calibration.gamma=auto"]), None)


def test_auto_is_deterministic():
    data = _synthetic(12.0, n=3000)
    assert fit_gamma(*data, INV_TAU) == fit_gamma(*data, INV_TAU)
