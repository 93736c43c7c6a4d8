"""The next step's batch, built on the host while the accelerator runs this step.

A step's batch is a pure function of (step, consumed samples): the sample order and the
masks of `pipeline.data.batches.Batches`, at the curriculum's rate for the consumed samples, with
FreeAT's replays repeating their batch's. Both are known for step N + 1 before step N's
stats are read back (`pipeline.train.step.consumed_after` counts as `advance_state` will), so the loop
queues step N on the device, builds step N + 1's batch (the numpy masking, the pinned
tensors) and only then waits for step N's read-back; otherwise the device would idle while
the host builds it. `StepInputs` keeps the batch it built last with what it was built for,
returns it when asked for the same and builds anew otherwise: prefetching changes when a
batch is built, never what it holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.batches import Batches, StepBatches
from pipeline.data.sampling import epoch_fraction
from pipeline.methods.registry import method_of

if TYPE_CHECKING:
    from pipeline.train.config import RunConfig


class StepInputs:
    """A step's batches and mask rate, from (step, consumed samples); the last ones built are kept."""

    def __init__(self, batches: Batches, config: RunConfig):
        """``config``: the RunConfig (the masking schedule; adversarial, for FreeAT's replays)."""
        self.batches, self.config, self.method = batches, config, method_of(config.adversarial)
        self._built: tuple[tuple[int, int], StepBatches, float] | None = None

    def __call__(self, step: int, consumed_samples: int) -> tuple[StepBatches, float]:
        """(the batches of optimizer step ``step``, their mask rate), built now unless built already."""
        key = (step - self.method.replay_index(step), consumed_samples)  # a replay is its batch's first step's
        if self._built is None or self._built[0] != key:
            rate = self.config.masking.schedule.rate(epoch_fraction(consumed_samples, len(self.batches.dataset)))
            self._built = (key, self.batches.for_step(*key, rate), rate)
        return self._built[1], self._built[2]
