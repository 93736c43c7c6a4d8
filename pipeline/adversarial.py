"""The adversarial objectives behind one call, `compute_losses`, and their config section.

`adversarial.method` picks one; all perturb the embeddings through the same mechanics
(`pipeline.objective`: dropout replay, float32 losses, the non-finite guard;
`pipeline.perturbation`: units, norms, update rules, projection), and each method's own
file holds only what makes it itself:

- ``alum`` (`pipeline.alum`): the clean loss plus alpha times a virtual-adversarial
  symmetric KL (Liu et al. 2020), the pretraining method this project is built around;
- ``fgsm`` and ``fgm`` (`pipeline.fgm`): one sign / L2 gradient step, clean plus adversarial loss;
- ``pgd`` (`pipeline.pgd`): K projected steps from a random start, adversarial loss alone.

The same call serves pretraining (masked-LM logits of the masked tokens) and fine-tuning
(classification logits, one row per example), from DeepSpeed or from any PyTorch loop: it
imports no DeepSpeed. docs/ALUM.md says where each default comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline import checks
from pipeline.alum import alum_losses
from pipeline.fgm import fgm_losses
from pipeline.objective import AscentForward, Forward, StepLosses, clean_pass
from pipeline.perturbation import NORMS, SCALES, UPDATES
from pipeline.pgd import pgd_losses

METHODS = ("none", "alum", "fgsm", "fgm", "pgd")
PERTURB_AT = ("word_embeddings", "embedding_output")
KL_GRADS = ("detached", "full")
ON_VANISH = ("warn", "error")


@dataclass(frozen=True)
class AdversarialConfig:
    """The ``adversarial`` config section; docs/ALUM.md says where each default comes from."""

    method: str = "none"
    start_step: int = 0
    alpha: float = 10.0
    steps: int = 1
    update: str = "paper"
    scale: str = "relative"
    step_size: float = 1e-1
    noise_std: float = 1e-2
    eps: float | None = None
    norm: str = "linf"
    grad_eps: float = 1e-12
    perturb_at: str = "embedding_output"
    kl_grad: str = "detached"
    vanish_ratio: float = 1e-5
    vanish_steps: int = 10
    on_vanish: str = "warn"

    def __post_init__(self) -> None:
        """A bad setting fails where the config is built, naming the field (the loader adds ``adversarial.``)."""
        checks.choice("method", self.method, METHODS)
        checks.choice("update", self.update, UPDATES)
        checks.choice("scale", self.scale, SCALES)
        checks.choice("norm", self.norm, NORMS)
        checks.choice("perturb_at", self.perturb_at, PERTURB_AT)
        checks.choice("kl_grad", self.kl_grad, KL_GRADS)
        checks.choice("on_vanish", self.on_vanish, ON_VANISH)
        checks.integer("start_step", self.start_step, minimum=0)
        checks.integer("steps", self.steps, minimum=1)
        checks.integer("vanish_steps", self.vanish_steps, minimum=1)
        checks.number("alpha", self.alpha)
        checks.number("step_size", self.step_size)
        checks.number("noise_std", self.noise_std)
        checks.number("grad_eps", self.grad_eps, positive=True)
        checks.number("vanish_ratio", self.vanish_ratio)
        if self.eps is not None:
            checks.number("eps", self.eps, positive=True)

    def active(self, step: int) -> bool:
        """Whether the adversarial term is on at this optimizer step (standard phase first)."""
        return self.method != "none" and step >= self.start_step


def compute_losses(
    forward: Forward,
    ascent_forward: AscentForward,
    labels: Tensor,
    config: AdversarialConfig,
    step: int,
    real: Tensor | None = None,
) -> StepLosses:
    """One micro-batch's losses: the clean loss, plus the method's adversarial objective from
    ``adversarial.start_step`` on.

    ``real`` marks real tokens [B, T] (the attention mask); None means every token is real.
    Calls no ``backward``: ascent gradients are taken with ``torch.autograd.grad`` with
    respect to delta alone, so the trainer's single backward of ``loss`` is the only one.
    No host sync: a non-finite gradient or term is dropped with ``torch.where``.
    """
    active = config.active(step)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not (active and config.method == "pgd")):
        clean = clean_pass(forward, labels, real)
    if not active:
        return StepLosses.clean(clean.loss)
    if config.method == "alum":
        return alum_losses(clean, forward, ascent_forward, config)
    if config.method == "pgd":
        return pgd_losses(clean, forward, ascent_forward, labels, config)
    return fgm_losses(clean, forward, ascent_forward, labels, config)
