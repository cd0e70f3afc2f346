"""γ without a sweep: temperature scaling of the frozen teacher, from the teacher cache.

AGFT's targets are p_cal = softmax(γ/τ · cos(f_orig(x), t)). γ/τ is the teacher's logit scale; the scale
at which the teacher's class probabilities are calibrated on the training distribution is the classic
temperature-scaling fit (Guo et al., 2017): the scale s minimising the teacher's negative log-likelihood
of the true labels. NLL rather than ECE, because NLL is a proper scoring rule and convex in s (a
log-sum-exp of functions linear in s, minus a linear term), so the minimum is unique and found exactly,
while ECE is a binned, piecewise-constant function of s with many minima. Then γ = s · τ, at most 1.

The fit uses a held-out fifth of the training split (images whose index is a multiple of 5, so the
choice needs no seed); the curve on the other four fifths is returned too, as a check that the chosen
γ holds beyond the images it was fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

HOLDOUT_EVERY = 5
SMALLEST_GAMMA = 1e-3
LARGEST_UNCLIPPED = 1e3


@dataclass(frozen=True)
class Calibration:
    scale: float  # s*, the teacher's NLL-minimising logit scale
    inv_tau: float  # the student's logit scale 1/τ the fit was reported at
    nll: float  # the teacher's NLL at scale γ/τ, on the held-out fit part
    curve: dict[str, list[float]]  # "gamma", "nll_fit" (held-out part), "nll_rest" (the other images)

    @property
    def gamma(self) -> float:
        """γ = s*·τ at the 1/τ of the fit, at most 1."""
        return self.gamma_for(self.inv_tau)

    @property
    def unclipped_gamma(self) -> float:
        """s*·τ before clipping: above 1, the teacher would be sharpened beyond the student's scale."""
        return self.scale / self.inv_tau

    def gamma_for(self, inv_tau: float) -> float:
        """γ for another 1/τ (a sweep's trial): the same fitted scale, so γ = min(1, s*·τ)."""
        return min(1.0, self.scale / inv_tau)


def teacher_nll(cos: torch.Tensor, labels: torch.Tensor, scale: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(scale · cos), in fp64."""
    return F.cross_entropy(scale * cos, labels).item()


def fit_gamma(
    teacher_emb: torch.Tensor,
    labels: torch.Tensor,
    index: torch.Tensor,
    text_emb: torch.Tensor,
    inv_tau: float,
    curve_points: int = 60,
) -> Calibration:
    """γ from the teacher's L2-normalised image embeddings of the training split (with their labels and
    dataset indices) and the class text embeddings, for the student's logit scale inv_tau."""
    cos = teacher_emb.double() @ text_emb.double().T
    fit = index % HOLDOUT_EVERY == 0
    if fit.all() or not fit.any():  # too few images to hold a part out: fit on all of them
        fit = torch.ones_like(fit)
    fit_cos, fit_labels = cos[fit], labels[fit]
    # Searched in log s (the NLL, convex in s, is unimodal there too) and beyond γ = 1, to report how far
    # the teacher would sharpen; by convexity the minimiser clipped to γ ≤ 1 is the minimiser under that bound.
    best = minimize_scalar(
        lambda log_s: teacher_nll(fit_cos, fit_labels, float(np.exp(log_s))),
        bounds=(np.log(SMALLEST_GAMMA * inv_tau), np.log(LARGEST_UNCLIPPED * inv_tau)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    scale = float(np.exp(best.x))
    gamma = min(1.0, scale / inv_tau)
    grid = np.geomspace(0.02, 1.0, curve_points)
    rest = ~fit if (~fit).any() else fit
    curve = {
        "gamma": grid.tolist(),
        "nll_fit": [teacher_nll(fit_cos, fit_labels, g * inv_tau) for g in grid],
        "nll_rest": [teacher_nll(cos[rest], labels[rest], g * inv_tau) for g in grid],
    }
    return Calibration(scale, inv_tau, teacher_nll(fit_cos, fit_labels, gamma * inv_tau), curve)
