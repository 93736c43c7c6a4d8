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

The perturbation lives between optimizer steps (`Carry`, one per micro-batch of the rank),
so a checkpoint is only taken once a batch's replays are done (`at_boundary`): a resumed
run starts the next batch from delta = 0, as the uninterrupted one does. The one exception
is the checkpoint at train.max_steps, taken wherever the run ends: continued with a higher
max_steps, the rest of that batch's replays start again from delta = 0.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.methods.objective import (
    Forward,
    StepLosses,
    ZeroDelta,
    backward_gradient,
    guarded,
    log_probs,
    nll,
    size,
    sizes_at,
)
from pipeline.model import perturbation


@dataclass
class Carry:
    """One micro-batch's perturbation, from one replay of its batch to the next."""

    delta: Tensor | None = None


def replay_index(config, step: int) -> int:
    """Which replay of its batch optimizer step `step` is (0 unless FreeAT is active)."""
    if config.method != "freeat" or not config.active(step):
        return 0
    return (step - config.start_step) % config.steps


def at_boundary(config, steps_done: int) -> bool:
    """Whether the `steps_done` optimizer steps end a batch's replays (a checkpoint may be taken)."""
    return replay_index(config, steps_done) == 0


def freeat_pass(
    forward: Forward, labels: Tensor, config, real: Tensor | None, carry: Carry
) -> Generator[Tensor, None, StepLosses]:
    zero = ZeroDelta()  # on a batch's first replay
    delta = carry.delta.requires_grad_(True) if carry.delta is not None else zero
    logits, embedded = forward(delta)
    delta = zero.tensor if carry.delta is None else delta
    real = torch.ones(embedded.shape[:-1], dtype=torch.bool, device=embedded.device) if real is None else real.bool()
    loss, keep = guarded(
        lambda q: nll(log_probs(q), labels), logits, torch.ones((), dtype=torch.bool, device=embedded.device)
    )
    yield loss
    grad, finite = backward_gradient(delta)
    bound = size(config) * perturbation.token_scale(embedded, config.scale)
    carry.delta = perturbation.project(delta.detach() + bound * grad.sign(), bound, "linf")
    return StepLosses(
        loss.detach(),
        loss.detach(),
        loss.detach(),
        *sizes_at(embedded, real, carry.delta, grad, "linf"),
        ~(keep & finite),
    )
