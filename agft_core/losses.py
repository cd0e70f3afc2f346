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


def zero_shot_logits(emb: torch.Tensor, text_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · cos(emb, t) for every class, in fp32 even inside autocast: at 1/τ = 180, bf16's 8-bit
    mantissa moves a logit by up to ~0.7, enough to reshape p_cal and flip argmaxes."""
    dtype = torch.promote_types(emb.dtype, torch.float32)  # fp64 stays fp64
    with torch.autocast(emb.device.type, enabled=False):
        return scale * emb.to(dtype) @ text_emb.to(dtype).T


def calibrated_targets(teacher_emb: torch.Tensor, text_emb: torch.Tensor, gamma: float, inv_tau: float) -> torch.Tensor:
    """p_cal: the teacher's class distribution at the calibrated logit scale γ/τ."""
    return F.softmax(zero_shot_logits(teacher_emb, text_emb, gamma * inv_tau), dim=-1)


def agft_loss(student_emb: torch.Tensor, targets: torch.Tensor, text_emb: torch.Tensor, inv_tau: float) -> torch.Tensor:
    return soft_cross_entropy(zero_shot_logits(student_emb, text_emb, inv_tau), targets)


def tecoa_loss(student_emb: torch.Tensor, labels: torch.Tensor, text_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """TeCoA: cross-entropy on hard labels at the zero-shot logit scale."""
    return F.cross_entropy(zero_shot_logits(student_emb, text_emb, scale), labels)


def kl_divergence(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target_logits) ‖ softmax(logits)), summed over classes, mean over the batch."""
    log_p, log_q = F.log_softmax(target_logits, dim=-1), F.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def pmg_aft_loss(
    adv_logits: torch.Tensor,
    orig_adv_logits: torch.Tensor,
    clean_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    form: str = "authors",
) -> torch.Tensor:
    """PMG-AFT: CE on x_adv (batch mean), plus a KL term to the frozen model on x_adv (α) and one to the student on x
    (β), each KL(other ‖ adv). form "authors", as its authors' final PMG_AFT.py (2024-05-29) computes them:
    nn.KLDivLoss(reduction="sum") of the adversarial student's log-probabilities against the other model's
    probabilities, i.e. summed over the batch (their first release had the two arguments the other way round);
    form "scaled", as agft computed them until 2026-12-06: batch means."""
    kl = alpha * kl_divergence(orig_adv_logits, adv_logits) + beta * kl_divergence(clean_logits, adv_logits)
    return F.cross_entropy(adv_logits, labels) + (len(adv_logits) * kl if form == "authors" else kl)


def fare_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FARE: squared L2 distance of unnormalised embeddings, summed over the embedding, mean over the batch."""
    return (student_features - teacher_features).pow(2).sum(dim=-1).mean()


def attention_map(tokens: torch.Tensor, class_text: torch.Tensor, image_size: int) -> torch.Tensor:
    """TGA-ZSR's text-guided attention: each patch token's similarity to its image's class text,
    min-max normalised per image and upsampled to the image. tokens [B, N, D], class_text [B, D]."""
    sim = torch.einsum("bnd,bd->bn", tokens, class_text)
    low, high = sim.amin(dim=1, keepdim=True), sim.amax(dim=1, keepdim=True)
    sim = (sim - low) / (high - low).clamp_min(1e-8)
    grid = int(round(sim.shape[1] ** 0.5))
    maps = sim.view(-1, 1, grid, grid)
    return F.interpolate(maps, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]


def tga_zsr_loss(
    adv_logits: torch.Tensor,
    labels: torch.Tensor,
    adv_map: torch.Tensor,
    clean_map: torch.Tensor,
    orig_map: torch.Tensor,
    *,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """TGA-ZSR: CE on x_adv + α‖A_θ(x_adv) − A_orig(x)‖ + β‖A_θ(x) − A_orig(x)‖, norms over the flattened map."""

    def distance(a, b):
        return (a - b).flatten(1).norm(dim=1).mean()

    return (
        F.cross_entropy(adv_logits, labels) + alpha * distance(adv_map, orig_map) + beta * distance(clean_map, orig_map)
    )
