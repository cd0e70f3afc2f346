"""Fine-tuning objectives. Embeddings are L2-normalised; text embeddings are [classes, dim].

AGFT (Alignment-Guided Fine-Tuning) in three lines:
    p_cal = softmax(γ/τ · cos(f_orig(x), t))      the calibrated teacher, on the clean image
    log q = log_softmax(1/τ · cos(f_θ(x_adv), t))  the student, on the adversarial image
    L     = −Σ_j p_cal_j · log q_j                 soft-target cross-entropy, mean over the batch
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def calibrated_targets(teacher_emb: torch.Tensor, text_emb: torch.Tensor, gamma: float, inv_tau: float) -> torch.Tensor:
    """p_cal: the teacher's class distribution at the calibrated logit scale γ/τ."""
    return F.softmax(gamma * inv_tau * teacher_emb @ text_emb.T, dim=-1)


def agft_loss(student_emb: torch.Tensor, targets: torch.Tensor, text_emb: torch.Tensor, inv_tau: float) -> torch.Tensor:
    return soft_cross_entropy(inv_tau * student_emb @ text_emb.T, targets)


def tecoa_loss(student_emb: torch.Tensor, labels: torch.Tensor, text_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """TeCoA: cross-entropy on hard labels at the zero-shot logit scale."""
    return F.cross_entropy(scale * student_emb @ text_emb.T, labels)
