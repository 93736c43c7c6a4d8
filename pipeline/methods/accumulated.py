"""FreeLB and YOPO: parameter gradients accumulated over several full passes, each at a
perturbation moved by the gradient its predecessor's backward left on delta.

    delta_0 = 0, or FreeLB's random start (init_mag)      (pass 0 at delta_0 = 0 is the clean pass)
    for k in 0 .. K-1:
        loss_k = CE(x + delta_k) / K ;  backward            (parameter gradients accumulate)
        p_k    = d loss_k / d delta_k                       (from that same backward)
        n times: delta = update(delta, p_k)                 (FreeLB: n = 1)
    parameter gradient = mean_k grad CE(x + delta_k)

- FreeLB (Zhu et al. 2020): K passes (``adversarial.steps``, default 2), one update per pass
  with ALUM's update rule and units (`pipeline.model.perturbation`). Its defaults follow
  FreeLB's code (zhuchen03/FreeLB, ``examples/run_glue_freelb.py``): delta added to the raw
  word embeddings (``perturb_at: word_embeddings``), the step ``adv_lr * g / ||g||`` with the
  L2 norm over each sequence's T x H values (``norm: l2``, ``norm_over: sequence``), and no
  projection (its ``adv_max_norm`` 0; ``eps`` bounds each sequence when set). The code's
  random start, U(-1, 1) x ``adv_init_mag / sqrt(length x H)`` on real tokens, is
  ``adversarial.init_mag``. Its default, null, is the code's argparse default ``adv_init_mag=0``
  (its launch scripts set a value per task): pass 0 is at delta = 0, so the first of the K
  passes is the clean pass, logged as ``loss_mlm``. With init_mag
  set there is no clean pass, as in the code: ``loss_mlm`` is the first pass's loss, at the
  random start. Sizes are in the ``scale`` units (``scale: absolute`` for the code's numbers).
- YOPO (Zhang et al. 2019): m full passes (``adversarial.steps``, default 2), each followed by
  n cheap updates (``adversarial.inner_steps``, default 3) that reuse the gradient p at the
  layer delta is added to instead of a new backward through the network: m x n updates for
  m backwards. YOPO's first layer is a convolution whose Jacobian it re-evaluates in the inner
  loop; here delta is added to an embedding output, the Jacobian of x + delta in delta is the
  identity, so the n updates move along p, each one projected onto ``eps`` when set (without
  a projection they add up to one step n times as long).

The dropout masks of every pass are the clean pass's (`pipeline.methods.objective.Replay`), as
FreeLB's code replays its ``dp_masks``. A non-finite gradient freezes delta for the rest of the
micro-batch and a non-finite loss contributes 0 (`guarded`), as in the other methods.
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
    every_token_or,
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
    zero = ZeroDelta(random_start(config, real_tokens))
    clean = clean_pass(forward, labels, real_tokens, zero, config.dropout)
    clean.replay.mark()
    unit = perturbation.token_scale(clean.embedded, config.scale)
    yield clean.loss / passes
    grad, finite = backward_gradient(zero.tensor)
    delta, adversarial, kept = zero.tensor.detach(), [], []
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


def random_start(config: AdversarialConfig, real_tokens: Tensor | None):
    """None (delta_0 = 0, the first pass is the clean one), or with ``adversarial.init_mag``
    the function that draws FreeLB's uniform start from the embeddings. Its noise comes from
    a generator seeded from the global RNG before the first pass: drawn from the global RNG
    inside that pass, it would shift the dropout masks the later passes replay."""
    if config.init_mag is None:
        return None
    seed = int(torch.randint(2**62, ()))

    def start(embedded: Tensor) -> Tensor:
        generator = torch.Generator(device=embedded.device).manual_seed(seed)
        unit = perturbation.token_scale(embedded, config.scale)
        real = every_token_or(real_tokens, embedded)
        return perturbation.uniform_start(embedded, unit, real, config.init_mag, config.norm, generator)

    return start


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
    default_norm_over = "sequence"  # FreeLB's code normalises its step over each sequence's T x H values
    default_perturb_at = "word_embeddings"  # FreeLB's code adds delta to the raw word embeddings
    random_start = True

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
    default_norm_over = "token"  # YOPO's code works per example, on images: per token is this project's reading
    default_perturb_at = "embedding_output"

    def updates(self) -> int:
        return self.config.inner_steps
