"""ALUM (Liu et al. 2020): a virtual-adversarial symmetric-KL term on top of the clean loss.

    delta        ~ N(0, (noise_std * r)^2), shaped like the perturbed embeddings
    K times:       g     = d KL(stopgrad(p) || q(delta)) / d delta      (delta only, no parameter grads)
                   delta = update(delta, g)                              (pipeline.model.perturbation)
    L_adv        = KL(p || q) + KL(q || p)   at delta.detach()
    loss         = L_clean + alpha * L_adv

Choices, and which source each follows (docs/ALUM.md has the study behind the defaults):

- Sizes and the update rule live in `pipeline.model.perturbation` (relative or absolute units;
  the normalised, projected or official rule, each labelled there by its source). The
  official code's magnitudes (step 1e-3, noise 1e-5, normaliser epsilon 1e-6) make the term
  numerically zero in float32 and exactly zero in bf16, hence relative defaults.
- ``kl_grad``: ``detached`` (default, as mt-dnn's ``SymKlCriterion``) computes
  KL(stopgrad(p) || q) + KL(stopgrad(q) || p), so each logit tensor is pulled towards the
  other and no gradient flows through a softmax used as a target. Near q = p that is half
  the gradient of the symmetric KL itself (each direction contributes the same first-order
  term, and detaching drops one of them): alpha = 10 detached acts like alpha = 5 in the
  paper's formula. ``full`` differentiates both directions completely.
- ``eps=None`` (the default) skips the projection, as the official pretraining code does.
- ``embedding_grad``: ``full`` (default, as mt-dnn's fine-tuning code) or ``detached`` (its
  pretraining plugin: delta is added to ``embed.data.detach()``, so the adversarial pass sends
  no gradient to the layers before delta; `pipeline.methods.objective.adversarial_delta`).
- ``dropout``: ``replay`` (default) or ``independent`` (both official ALUM versions: each pass
  draws its own masks), `pipeline.methods.objective.Replay`.

Amortized ALUM (``alum_amortized``) drops the ascent pass. ALUM's ascent is a forward and an
input-only backward whose parameter gradients are thrown away, then the clean and the
adversarial graphs are backwarded together: about 3 forwards and 3 backwards. Here the clean
loss is backwarded on its own first, and the gradient that backward leaves on the clean
embeddings gives the direction:

    pass 1:  L_clean;  backward                          g = d L_clean / d e  (e: the embeddings)
             delta = update(noise, g)                     (ALUM's rule, units and projection)
    pass 2:  alpha * SKL(stopgrad(p), q(delta));  backward
    parameter gradient = grad L_clean + alpha * grad KL(stopgrad(p) || q(delta))

Two forwards and two backwards, as a standard step twice over. It differs from ALUM in two
ways: the direction is that of the clean cross-entropy (FGM's) rather than the virtual
adversarial one (the KL's, which needs its own pass), and no gradient reaches the clean
logits through the term (their graph is freed by the first backward), so only q is pulled
towards p. docs/methods-bench.md and docs/results/ measure what that costs and buys.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.methods.method import Method
from pipeline.methods.objective import (
    AscentForward,
    CleanPass,
    Forward,
    StepLosses,
    ZeroDelta,
    adversarial_delta,
    backward_gradient,
    clean_pass,
    guarded,
    input_gradient,
    kl,
    log_probs,
    perturbation_stats,
    symmetric_kl_of,
)
from pipeline.model import perturbation

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig


def alum_losses(
    clean: CleanPass, forward: Forward, ascent_forward: AscentForward, config: AdversarialConfig
) -> StepLosses:
    unit = perturbation.token_scale(clean.embedded, config.scale)
    delta = perturbation.initial_noise(clean.embedded, unit, config.noise_std)
    clean.replay.mark()
    target = clean.log_probs.detach()
    finite = torch.ones((), dtype=torch.bool, device=delta.device)
    for _ in range(config.steps):
        clean.replay.again()
        delta.requires_grad_(True)
        grad, grad_finite = input_gradient(lambda q: kl(target, log_probs(q)), ascent_forward(delta), delta)
        finite = finite & grad_finite
        delta = perturbation.ascent_update(delta.detach(), grad, unit, config)

    clean.replay.again()
    q_logits, _ = forward(adversarial_delta(delta.detach(), config))
    clean.replay.finish()
    loss_adv, keep = guarded(lambda q: symmetric_kl_of(clean.log_probs, log_probs(q), config.kl_grad), q_logits, finite)
    loss = clean.loss + config.alpha * loss_adv
    return StepLosses(
        loss=loss,
        loss_mlm=clean.loss,
        loss_adv=loss_adv.detach(),
        **perturbation_stats(clean, delta, grad, config.norm),
        skipped=~keep,
    )


def amortized_alum_passes(
    forward: Forward, labels: Tensor, config: AdversarialConfig, real_tokens: Tensor | None
) -> Generator[Tensor, None, StepLosses]:
    zero = ZeroDelta()
    clean = clean_pass(forward, labels, real_tokens, zero, config.dropout)
    unit = perturbation.token_scale(clean.embedded, config.scale)
    noise = perturbation.initial_noise(clean.embedded, unit, config.noise_std)
    clean.replay.mark()
    yield clean.loss
    grad, finite = backward_gradient(zero.tensor)
    delta = perturbation.ascent_update(noise, grad, unit, config)
    clean.replay.again()
    q_logits, _ = forward(adversarial_delta(delta, config))
    clean.replay.finish()
    target = clean.log_probs.detach()
    loss_adv, keep = guarded(lambda q: symmetric_kl_of(target, log_probs(q), "detached"), q_logits, finite)
    yield config.alpha * loss_adv
    total = clean.loss.detach() + config.alpha * loss_adv.detach()
    return StepLosses(
        loss=total,
        loss_mlm=clean.loss.detach(),
        loss_adv=loss_adv.detach(),
        **perturbation_stats(clean, delta, grad, config.norm),
        skipped=~keep,
    )


class Alum(Method):
    """``alum``: the clean loss plus alpha times the virtual-adversarial symmetric KL, one backward."""

    name = "alum"
    detachable = True

    def losses(self, clean, forward, ascent_forward, labels, teacher) -> StepLosses:
        return alum_losses(clean, forward, ascent_forward, self.config)


class AlumAmortized(Method):
    """``alum_amortized``: the direction read off the clean loss's own backward, so two backwards."""

    name = "alum_amortized"
    detachable = True
    driven = True

    def backwards(self) -> int:
        return 2

    def driven_losses(self, forward, labels, real_tokens, carry, adversaries) -> Generator[Tensor, None, StepLosses]:
        return (yield from amortized_alum_passes(forward, labels, self.config, real_tokens))
