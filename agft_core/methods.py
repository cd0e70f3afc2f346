"""Fine-tuning methods: what each one attacks and what each one minimises.

Every method trains with one step, adversarial_step() at the end of this file (the Ray Train
loop in pipeline/train.py calls it per batch): prepare() once without gradients, fp32 PGD that
maximises attack_loss() through the bare student, then loss() on the clean and adversarial
images, minimised. `model` in loss() may be the student wrapped in DDP, so each method makes exactly
one forward call through it per step.

A method is its Method subclass here plus its row of agft_core.catalog.METHOD_SPECS (which caches it
reads, its defaults, its published recipe, what its runs log): a sixth method is one class and one row.

    method    attacks                          minimises
    agft      soft-target CE at 1/τ            soft-target CE to the calibrated teacher p_cal (cached)
    tecoa     CE on hard labels at the model's logit scale, for both
    pmg_aft   CE                               CE + Σ_batch α·KL(adv ‖ orig(x_adv)) + β·KL(adv ‖ student(x)),
                                               on cosine logits (its authors' code)
    pmg_aft_scaled                             CE + α·KL(orig(x_adv) ‖ adv) + β·KL(student(x) ‖ adv), batch means
                                               (agft's PMG-AFT until 2026-12-06)
    fare      ‖f_θ(x_adv) − f_orig(x)‖², for both (no labels)
    tga_zsr   CE                               CE + α‖A_θ(x_adv) − A_orig(x)‖ + β‖A_θ(x) − A_orig(x)‖
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from agft_core.attacks import pgd
from agft_core.catalog import METHOD_SPECS
from agft_core.losses import (
    agft_loss,
    attention_map,
    calibrated_targets,
    fare_loss,
    pmg_aft_loss,
    tecoa_loss,
    tga_zsr_loss,
    zero_shot_logits,
)


class Method:
    def __init__(self, text: torch.Tensor, scale: float):
        self.text, self.scale = text, scale

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(emb, self.text, self.scale)

    def prepare(self, x, labels, cached_teacher):
        return None

    def attack_loss(self, student: nn.Module, z, labels, state) -> torch.Tensor:
        """What PGD maximises; by default the hard-label CE at the model's logit scale."""
        return tecoa_loss(student(z), labels, self.text, self.scale)

    def loss(self, model: nn.Module, x, x_adv, labels, state) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the student's embeddings of x_adv)."""
        raise NotImplementedError


class TeCoA(Method):
    def loss(self, model, x, x_adv, labels, state):
        emb = model(x_adv).float()
        return tecoa_loss(emb, labels, self.text, self.scale), emb


class AGFT(Method):
    def __init__(self, text, scale, gamma: float, inv_tau: float):
        super().__init__(text, scale)
        self.gamma, self.inv_tau = gamma, inv_tau

    def prepare(self, x, labels, cached_teacher):
        return calibrated_targets(cached_teacher, self.text, self.gamma, self.inv_tau)

    def attack_loss(self, student, z, labels, targets):
        return agft_loss(student(z), targets, self.text, self.inv_tau)

    def loss(self, model, x, x_adv, labels, targets):
        emb = model(x_adv).float()
        return agft_loss(emb, targets, self.text, self.inv_tau), emb


class PMGAFT(Method):
    """As its authors' code computes it: the training attack's CE and every term of the loss on the cosine logits,
    unscaled (their attack_pgd and train on multiGPU_CLIP's logits_per_image)."""

    form = "authors"

    def __init__(self, text, scale, teacher: nn.Module, alpha: float, beta: float):
        super().__init__(text, scale)
        self.teacher, self.alpha, self.beta = teacher, alpha, beta

    @property
    def loss_scale(self) -> float:
        return 1.0

    def attack_loss(self, student, z, labels, state):
        return tecoa_loss(student(z), labels, self.text, self.loss_scale)

    def objective(self, adv, orig_adv, clean, labels) -> torch.Tensor:
        logits = [zero_shot_logits(emb, self.text, self.loss_scale) for emb in (adv, orig_adv, clean)]
        return pmg_aft_loss(*logits, labels, self.alpha, self.beta, form=self.form)

    def loss(self, model, x, x_adv, labels, state):
        adv, clean = model(torch.cat([x_adv, x])).float().chunk(2)
        with torch.no_grad():
            orig_adv = self.teacher(x_adv).float()
        return self.objective(adv, orig_adv, clean, labels), adv


class PMGAFTScaled(PMGAFT):
    """The form agft trained PMG-AFT with until 2026-12-06, kept to compare with: at the model's logit scale."""

    form = "scaled"

    @property
    def loss_scale(self) -> float:
        return self.scale


class FARE(Method):
    def __init__(self, text, scale, teacher: nn.Module):
        super().__init__(text, scale)
        self.teacher = teacher

    def prepare(self, x, labels, cached_teacher):
        return self.teacher(x, output="features").float()

    def attack_loss(self, student, z, labels, teacher_features):
        return fare_loss(student(z, output="features"), teacher_features)

    def loss(self, model, x, x_adv, labels, teacher_features):
        features = model(x_adv, output="features").float()
        return fare_loss(features, teacher_features), F.normalize(features, dim=-1)


class TGAZSR(Method):
    def __init__(self, text, scale, teacher: nn.Module, alpha: float, beta: float):
        super().__init__(text, scale)
        self.teacher, self.alpha, self.beta = teacher, alpha, beta

    def _maps(self, tokens, labels, size):
        return attention_map(tokens.float(), self.text[labels], size)

    def prepare(self, x, labels, cached_teacher):
        _, tokens = self.teacher(x, output="tokens")
        return self._maps(tokens, labels, x.shape[-1])

    def loss(self, model, x, x_adv, labels, orig_map):
        emb, tokens = model(torch.cat([x_adv, x]), output="tokens")
        adv, _ = emb.float().chunk(2)
        adv_map, clean_map = self._maps(tokens, torch.cat([labels, labels]), x.shape[-1]).chunk(2)
        return tga_zsr_loss(
            self.logits(adv), labels, adv_map, clean_map, orig_map, alpha=self.alpha, beta=self.beta
        ), adv


def build_method(
    name: str,
    text: torch.Tensor,
    scale: float,
    *,
    gamma: float,
    inv_tau: float,
    teacher: nn.Module | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Method:
    """The loss of METHOD_SPECS[name], given the settings its class takes. text: the training classes' prompt
    embeddings; scale: the model's own logit scale; teacher: the frozen encoder (spec.frozen_encoder)."""
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHOD_SPECS)}")
    spec = METHOD_SPECS[name]
    if spec.frozen_encoder and teacher is None:
        raise ValueError(f"{name} needs the frozen teacher encoder")
    loss = globals()[spec.loss]
    settings = {"gamma": gamma, "inv_tau": inv_tau, "teacher": teacher, "alpha": alpha, "beta": beta}
    taken = inspect.signature(loss).parameters
    return loss(text, scale, **{key: value for key, value in settings.items() if key in taken})


def autocast(amp: str, device: torch.device):
    # AMP is a GPU feature here; CPU training stays fp32 (CPU autocast is slower on most CPUs).
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


def adversarial_step(model, raw, method: Method, x, labels, *, cached_teacher, attack, amp: str, optimizer, scaler):
    """One update: fp32 PGD on the method's attack loss through the bare encoder `raw`, then its
    loss on x and x_adv. model is raw, or raw wrapped in DDP (the attack bypasses DDP's hooks).
    Returns the loss and the student's embeddings of x_adv, detached.
    """
    with torch.no_grad():
        state = method.prepare(x, labels, cached_teacher)
    x_adv = pgd(lambda z: method.attack_loss(raw, z, labels, state), x, attack.eps, attack.alpha, attack.steps)
    with autocast(amp, x.device):
        loss, student_emb = method.loss(model, x, x_adv, labels, state)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), student_emb.detach().float()
