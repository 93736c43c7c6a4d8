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

import torch

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
    size,
    sizes,
)
from pipeline.model import perturbation
from pipeline.model.perturbation import token_norm


def pgd_losses(clean: CleanPass, forward: Forward, ascent_forward: AscentForward, labels, config) -> StepLosses:
    unit = perturbation.token_scale(clean.embedded, config.scale)
    bound = size(config) * unit
    start = (torch.rand(clean.embedded.shape, device=unit.device).to(unit.dtype) * 2 - 1) * bound
    delta = perturbation.project(start, bound, config.norm)
    clean.replay.mark()
    step = 2.5 * size(config) / config.steps * unit
    finite = torch.ones((), dtype=torch.bool, device=unit.device)
    for _ in range(config.steps):
        clean.replay.again()
        delta.requires_grad_(True)
        grad, grad_finite = input_gradient(lambda q: nll(log_probs(q), labels), ascent_forward(delta), delta)
        finite = finite & grad_finite
        direction = (
            grad.sign() if config.norm == "linf" else grad / (token_norm(grad, "l2").unsqueeze(-1) + config.grad_eps)
        )
        delta = perturbation.project(delta.detach() + step * direction, bound, config.norm)
    clean.replay.again()
    adv_logits, _ = forward(delta)
    clean.replay.finish()
    loss_adv, keep = guarded(lambda q: nll(log_probs(q), labels), adv_logits, finite)
    return StepLosses(loss_adv, clean.loss, loss_adv.detach(), *sizes(clean, delta, grad, config.norm), ~keep)


class Pgd(Method):
    """``pgd``: K projected steps, trained on the adversarial loss alone (the clean one is logged)."""

    name = "pgd"
    trains_clean = False
    default_steps = 3

    def losses(self, clean, forward, ascent_forward, labels, teacher) -> StepLosses:
        return pgd_losses(clean, forward, ascent_forward, labels, self.config)
