"""FreeLB and YOPO: parameter gradients accumulated over several full passes, each at a
perturbation moved by the gradient its predecessor's backward left on delta.

    delta_0 = 0                                             (pass 0 is the clean pass)
    for k in 0 .. K-1:
        loss_k = CE(x + delta_k) / K ;  backward            (parameter gradients accumulate)
        p_k    = d loss_k / d delta_k                       (from that same backward)
        n times: delta = update(delta, p_k)                 (FreeLB: n = 1)
    parameter gradient = mean_k grad CE(x + delta_k)

- FreeLB (Zhu et al. 2020): K passes (``adversarial.steps``, default 2), one update per pass
  with ALUM's update rule and units (`pipeline.model.perturbation`: step ``step_size`` per token,
  per-token L2 by default as FreeLB's code normalises, projection onto ``eps`` when set;
  FreeLB's code defaults to no projection, max-norm 0).
  FreeLB starts from a random delta of magnitude ``adv_init_mag``; here pass 0 is at delta
  = 0 (FreeLB's code allows ``adv_init_mag=0``), so the first of the K passes is the clean
  pass, logged as ``loss_mlm``, and the per-token units are known before delta is drawn.
- YOPO (Zhang et al. 2019): m full passes (``adversarial.steps``, default 2), each followed by
  n cheap updates (``adversarial.inner_steps``, default 3) that reuse the gradient p at the
  layer delta is added to instead of a new backward through the network: m x n updates for
  m backwards. YOPO's first layer is a convolution whose Jacobian it re-evaluates in the inner
  loop; here delta is added to an embedding output, the Jacobian of x + delta in delta is the
  identity, so the n updates move along p, each one projected onto ``eps`` when set (without
  a projection they add up to one step n times as long).

The dropout masks of every pass are the clean pass's (`pipeline.methods.objective.Replay`). A
non-finite gradient freezes delta for the rest of the micro-batch and a non-finite loss
contributes 0 (`guarded`), as in the other methods.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.methods.method import Method
from pipeline.methods.objective import (
    Forward,
    StepLosses,
    ZeroDelta,
    backward_gradient,
    clean_pass,
    guarded,
    log_probs,
    nll,
    perturbation_stats,
)
from pipeline.model import perturbation

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig


def accumulated_passes(
    forward: Forward, labels: Tensor, config: AdversarialConfig, real_tokens: Tensor | None, updates: int = 1
) -> Generator[Tensor, None, StepLosses]:
    """K (or m) passes, each followed by ``updates`` moves of delta (FreeLB: 1; YOPO: n)."""
    passes = config.steps
    zero = ZeroDelta()
    clean = clean_pass(forward, labels, real_tokens, zero, config.dropout)
    clean.replay.mark()
    unit = perturbation.token_scale(clean.embedded, config.scale)
    yield clean.loss / passes
    grad, finite = backward_gradient(zero.tensor)
    delta, adversarial, kept = torch.zeros(clean.embedded.shape, dtype=unit.dtype, device=unit.device), [], []
    for _ in range(1, passes):
        delta = move(delta, grad, unit, updates, config)
        clean.replay.again()
        delta.requires_grad_(True)
        adv_logits, _ = forward(delta)
        loss, keep = guarded(lambda q: nll(log_probs(q), labels), adv_logits, finite)
        adversarial.append(loss.detach())
        kept.append(keep)
        yield loss / passes
        step_grad, step_finite = backward_gradient(delta)
        finite = finite & step_finite
        grad, delta = torch.where(finite, step_grad, torch.zeros_like(step_grad)), delta.detach()
    delta = move(delta, grad, unit, updates, config)  # the last updates, as the methods make them (for the logged size)
    clean.replay.finish()
    loss_adv = torch.stack(adversarial).mean() if adversarial else torch.zeros((), device=unit.device)
    total = (clean.loss.detach() + loss_adv * len(adversarial)) / passes
    skipped = ~torch.stack(kept).all() if kept else ~finite
    return StepLosses(
        loss=total,
        loss_mlm=clean.loss.detach(),
        loss_adv=loss_adv,
        **perturbation_stats(clean, delta, grad, config.norm),
        skipped=skipped,
    )


def move(delta: Tensor, grad: Tensor, unit: Tensor, updates: int, config: AdversarialConfig) -> Tensor:
    """`updates` ascent updates of delta along the same gradient (pipeline.model.perturbation)."""
    for _ in range(updates):
        delta = perturbation.ascent_update(delta, grad, unit, config)
    return delta.detach()


class FreeLB(Method):
    """``freelb``: K passes, delta moved once between them."""

    name = "freelb"
    driven = True
    default_steps = 2  # the FreeLB repository's launch scripts
    default_norm = "l2"  # FreeLB's code's; its per-token L-inf step drove SST-2 to the majority class

    def backwards(self) -> int:
        return self.config.steps

    def driven_losses(self, forward, labels, real_tokens, carry, adversaries) -> Generator[Tensor, None, StepLosses]:
        return (yield from accumulated_passes(forward, labels, self.config, real_tokens, self.updates()))

    def updates(self) -> int:
        """Moves of delta after each pass."""
        return 1


class Yopo(FreeLB):
    """``yopo``: m passes, each followed by n cheap updates along the same gradient."""

    name = "yopo"

    def updates(self) -> int:
        return self.config.inner_steps
