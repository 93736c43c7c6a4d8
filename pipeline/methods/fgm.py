"""FGSM and FGM: one gradient step on the embeddings, then training on the clean and the
adversarial loss. FGSM is FGM with a sign step.

    g     = d CE(x) / d delta  at delta = 0            (delta only, no parameter grads)
    FGSM:  delta = eps * r * sign(g)                    (Goodfellow et al. 2015)
           loss  = 0.5 * CE(x) + 0.5 * CE(x + delta)    (their alpha = 0.5)
    FGM:   delta = eps * r * g / ||g||_2                (Miyato et al. 2017)
           loss  = CE(x) + CE(x + delta)                (their adversarial weight 1)

CE is the clean objective: masked-LM cross-entropy in pretraining, classification
cross-entropy in fine-tuning. ``eps`` is ``adversarial.eps``, or ``adversarial.step_size``
when eps is null, in the units of ``adversarial.scale`` (r: each token's embedding RMS when
relative). The papers' own sizes do not carry over: Goodfellow's 0.25 is in pixel units,
and Miyato's 5.0 is an L2 norm over a whole sequence of normalised word embeddings; here
the norm is per token (FGM's ||delta_t||_2 = eps * r_t), so long and short sequences get the
same strength, and ALUM's default step (0.1) is the default size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    perturbation_radius,
    perturbation_stats,
)
from pipeline.model import perturbation
from pipeline.model.perturbation import token_norm

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig


def fgm_losses(
    clean: CleanPass,
    forward: Forward,
    ascent_forward: AscentForward,
    labels,
    *,
    config: AdversarialConfig,
    sign: bool,
    weights: tuple[float, float],
) -> StepLosses:
    """A sign (FGSM) or L2 (FGM) step; ``weights``: (the clean loss's, the adversarial loss's)."""
    unit = perturbation.token_scale(clean.embedded, config.scale)
    step = perturbation_radius(config) * unit
    clean.replay.mark()
    clean.replay.again()
    start = torch.zeros(clean.embedded.shape, dtype=unit.dtype, device=unit.device, requires_grad=True)
    grad, finite = input_gradient(lambda q: nll(log_probs(q), labels), ascent_forward(start), start)
    if sign:
        delta, norm = step * grad.sign(), "linf"
    else:
        delta, norm = step * grad / (token_norm(grad, "l2").unsqueeze(-1) + config.grad_eps), "l2"
    clean.replay.again()
    adv_logits, _ = forward(delta)
    clean.replay.finish()
    loss_adv, keep = guarded(lambda q: nll(log_probs(q), labels), adv_logits, finite)
    clean_weight, adv_weight = weights
    loss = torch.where(keep, clean_weight, 1.0) * clean.loss + adv_weight * loss_adv
    return StepLosses(
        loss=loss,
        loss_mlm=clean.loss,
        loss_adv=loss_adv.detach(),
        **perturbation_stats(clean, delta, grad, norm),
        skipped=~keep,
    )


class Fgm(Method):
    """``fgm``: one L2-normalised step, clean plus adversarial loss (Miyato's weights)."""

    name = "fgm"
    sign = False
    weights = (1.0, 1.0)  # (the clean loss's, the adversarial loss's)

    def losses(self, clean, forward, ascent_forward, labels, teacher) -> StepLosses:
        return fgm_losses(
            clean, forward, ascent_forward, labels, config=self.config, sign=self.sign, weights=self.weights
        )


class Fgsm(Fgm):
    """``fgsm``: one sign step, half clean and half adversarial loss (Goodfellow's alpha)."""

    name = "fgsm"
    sign = True
    weights = (0.5, 0.5)
