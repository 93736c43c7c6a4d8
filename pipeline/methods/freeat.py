"""FreeAT (Shafahi et al. 2019, "Adversarial training for free!"): each batch is replayed m
times, and every replay both updates the parameters and moves the perturbation, reusing
the one backward for both.

    replay 0:   delta = 0
    replay r:   loss = CE(x + delta);  backward;  optimizer step
                delta <- clip_eps(delta + eps * r_t * sign(d loss / d delta))   (carried to replay r + 1)

m is ``adversarial.steps`` (default 2) and eps is ``adversarial.eps``, or ``step_size`` when
null (the paper's step equals its bound). Each replay is an optimizer step, so a run makes m
steps per batch and sees 1/m of the data in the same number of steps: the paper divides the
epochs by m to keep the cost of standard training. A replay is one forward and one
backward, nothing more: there is no separate clean pass, so ``train/loss_mlm`` and
``train/loss_adv`` both log the loss trained on (at delta = 0 on a batch's first replay).
The dropout masks are drawn afresh on each replay, a training step of its own.

The perturbation lives between optimizer steps (`ReplayPerturbation`, one per micro-batch of
the rank), so a checkpoint is only taken once a batch's replays are done (`FreeAt.at_boundary`):
a resumed run starts the next batch from delta = 0, as the uninterrupted one does. The one exception
is the checkpoint at train.max_steps, taken wherever the run ends: continued with a higher
max_steps, the rest of that batch's replays start again from delta = 0.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.methods.method import Method
from pipeline.methods.objective import (
    Forward,
    StepLosses,
    ZeroDelta,
    backward_gradient,
    every_token_or,
    guarded,
    log_probs,
    nll,
    perturbation_radius,
    perturbation_stats_at,
)
from pipeline.model import perturbation

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig


@dataclass
class ReplayPerturbation:
    """One micro-batch's perturbation, from one replay of its batch to the next."""

    delta: Tensor | None = None


def freeat_pass(
    forward: Forward, labels: Tensor, config: AdversarialConfig, real_tokens: Tensor | None, carry: ReplayPerturbation
) -> Generator[Tensor, None, StepLosses]:
    """One replay: its loss to backward, then the perturbation its backward moves into ``carry``."""
    zero = ZeroDelta()  # on a batch's first replay
    delta = carry.delta.requires_grad_(True) if carry.delta is not None else zero
    logits, embedded = forward(delta)
    delta = zero.tensor if carry.delta is None else delta
    real_tokens = every_token_or(real_tokens, embedded)
    loss, keep = guarded(
        lambda q: nll(log_probs(q), labels), logits, torch.ones((), dtype=torch.bool, device=embedded.device)
    )
    yield loss
    grad, finite = backward_gradient(delta)
    bound = perturbation_radius(config) * perturbation.token_scale(embedded, config.scale)
    carry.delta = perturbation.project(delta.detach() + bound * grad.sign(), bound, "linf")
    return StepLosses(
        loss=loss.detach(),
        loss_mlm=loss.detach(),
        loss_adv=loss.detach(),
        **perturbation_stats_at(embedded, real_tokens, carry.delta, grad, "linf"),
        skipped=~(keep & finite),
    )


class FreeAt(Method):
    """``freeat``: each batch replayed m times, one optimizer step per replay."""

    name = "freeat"
    driven = True
    default_steps = 2  # m, FreeLB's budget

    def replay_index(self, step: int) -> int:
        if not self.active(step):
            return 0
        return (step - self.config.start_step) % self.config.steps

    def driven_losses(self, forward, labels, real_tokens, carry, adversaries) -> Generator[Tensor, None, StepLosses]:
        if carry is None:
            raise ValueError(
                "adversarial.method=freeat needs the micro-batch's ReplayPerturbation (pipeline.methods.freeat)"
            )
        return (yield from freeat_pass(forward, labels, self.config, real_tokens, carry))
