"""PGD (Madry et al. 2018): K projected gradient-ascent steps on the embeddings from a
random start in the eps-ball, then training on the adversarial loss alone.

    delta_0 ~ U(-eps, eps) * r, projected into the ball
    K times:  g = d CE(x + delta) / d delta;  delta = proj_eps(delta + a * r * s(g)),  a = 2.5 eps / K
    loss    = CE(x + delta_K)

s(g) is sign(g) for ``norm: linf`` (Madry's L-inf attack) and g / ||g||_2 per token for l2.
The step a = 2.5 eps / K is Madry's rule (long enough to reach the boundary from anywhere,
then move along it), as `alum eval`'s PGD attack uses. ``eps`` is ``adversarial.eps``, or
``adversarial.step_size`` when null; K is ``adversarial.steps``. The clean pass runs without
gradients (it is logged as ``train/loss_mlm``, not trained on), so a step costs
(K + 1) forwards, K input-only backwards and one full backward. A non-finite term drops the
micro-batch's contribution: its adversarial loss is its only loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.methods.method import Method
from pipeline.methods.objective import (
    AscentForward,
    CleanPass,
    Forward,
    StepLosses,
    guarded,
    input_gradient,
    log_probs,
    nll,
    perturbation_radius,
    perturbation_stats,
)
from pipeline.model import perturbation
from pipeline.model.perturbation import token_norm

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig


def pgd_losses(
    clean: CleanPass, forward: Forward, ascent_forward: AscentForward, labels, config: AdversarialConfig
) -> StepLosses:
    unit = perturbation.token_scale(clean.embedded, config.scale)
    bound = perturbation_radius(config) * unit
    start = (torch.rand(clean.embedded.shape, device=unit.device).to(unit.dtype) * 2 - 1) * bound
    delta = perturbation.project(start, bound, config.norm)
    clean.replay.mark()

    def replayed(delta: Tensor) -> Tensor:
        clean.replay.again()
        return ascent_forward(delta)

    delta, grad, finite = pgd_ascent(
        replayed,
        lambda q: nll(log_probs(q), labels),
        delta,
        unit=unit,
        radius=perturbation_radius(config),
        steps=config.steps,
        norm=config.norm,
        grad_eps=config.grad_eps,
    )
    clean.replay.again()
    adv_logits, _ = forward(delta)
    clean.replay.finish()
    loss_adv, keep = guarded(lambda q: nll(log_probs(q), labels), adv_logits, finite)
    return StepLosses(
        loss=loss_adv,
        loss_mlm=clean.loss,
        loss_adv=loss_adv.detach(),
        **perturbation_stats(clean, delta, grad, config.norm),
        skipped=~keep,
    )


def pgd_ascent(
    logits_of: AscentForward,
    loss_of: Callable[[Tensor], Tensor],
    delta: Tensor,
    *,
    unit: Tensor,
    radius: float,
    steps: int,
    norm: str = "linf",
    grad_eps: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """PGD's ascent, shared by training (`pgd_losses`) and `alum eval`'s robustness attack so
    that both attack alike: ``steps`` steps of 2.5 radius / steps from ``delta``, each along
    the sign (linf) or the per-token unit vector (l2) of d loss_of(logits_of(delta)) / d delta,
    then projected into the per-token ball of radius x ``unit`` [B, T, 1].

    What differs between the callers is theirs to pass: the start (random or zero), the loss
    attacked (a mean or a sum), and ``logits_of``, which replays dropout in training; the
    gradient is taken with respect to delta alone, so no parameter gradient accumulates.
    Returns (the final delta, the last gradient, whether every gradient was finite; a
    non-finite one is zeroed before it moves delta)."""
    bound, step = radius * unit, 2.5 * radius / steps * unit
    finite = torch.ones((), dtype=torch.bool, device=unit.device)
    for _ in range(steps):
        delta.requires_grad_(True)
        grad, grad_finite = input_gradient(loss_of, logits_of(delta), delta)
        finite = finite & grad_finite
        direction = grad.sign() if norm == "linf" else grad / (token_norm(grad, "l2").unsqueeze(-1) + grad_eps)
        delta = perturbation.project(delta.detach() + step * direction, bound, norm)
    return delta, grad, finite


class Pgd(Method):
    """``pgd``: K projected steps, trained on the adversarial loss alone (the clean one is logged)."""

    name = "pgd"
    trains_clean = False
    default_steps = 3

    def losses(self, clean, forward, ascent_forward, labels, teacher) -> StepLosses:
        return pgd_losses(clean, forward, ascent_forward, labels, self.config)
