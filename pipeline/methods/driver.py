"""The one loop over a method's backward passes, for every trainer.

The pretraining step (`pipeline.train.step`), `alum finetune` and bench/bench_methods.py
each hand a micro-batch to `drive` with their own ``backward``: DeepSpeed's, marking only
the step's last pass as the gradient-accumulation boundary, or `Tensor.backward`. What
comes before (the batch on the device) and after (the optimizer step, the companion's
update) stays theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from torch import Tensor

from pipeline.methods.companion import Companion
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.method import ModuleForward
from pipeline.methods.objective import AscentForward, Forward, StepLosses
from pipeline.methods.registry import method_of

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig


def drive(
    config: AdversarialConfig,
    *,
    step: int,
    forward: Forward,
    ascent_forward: AscentForward,
    labels: Tensor,
    backward: Callable[[Tensor], None],
    real_tokens: Tensor | None = None,
    companion: Companion | None = None,
    module_forward: ModuleForward | None = None,
    carry: ReplayPerturbation | None = None,
) -> StepLosses:
    """One micro-batch of ``config``'s method at optimizer step ``step``: `backward` each loss
    it yields, in order; returns its numbers. ``module_forward(module)`` runs the micro-batch
    through another module (SMART's teacher); ``carry``: FreeAT's perturbation of the micro-batch."""
    method = method_of(config)
    losses = method.objective(
        forward,
        ascent_forward,
        labels,
        step=step,
        real_tokens=real_tokens,
        carry=carry,
        **method.objective_args(companion, module_forward),
    )
    return run_objective(losses, backward)


def run_objective(losses: Generator[Tensor, None, StepLosses], backward: Callable[[Tensor], None]) -> StepLosses:
    """Drive an `objective`: `backward` each loss it yields, in order; its micro-batch's numbers."""
    while True:
        try:
            loss = next(losses)
        except StopIteration as done:
            return done.value
        backward(loss)
