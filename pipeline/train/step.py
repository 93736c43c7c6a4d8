"""One optimizer step, and what the trainer learns from it.

`train_step` runs forward, losses and backward for each of this rank's micro-batches and
lets DeepSpeed step. A method may take several backward passes per micro-batch
(`pipeline.methods.method.Method.passes`); the trainer marks the step's last backward as DeepSpeed's
gradient-accumulation boundary itself, so every pass's gradients accumulate (ZeRO 1-3
reduce them at that boundary or bucket by bucket as usual) and the optimizer steps once.
Every number stays on the device; `StepStats.gather` sums them over the ranks in one
all-reduce and reads them back: the step's single host sync. `advance_state` counts the step
into the run's state (`consumed_after` says in advance what it will count) and
`check_health` stops a run that cannot go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import deepspeed.comm as dist
import torch
from torch import Tensor

from pipeline.data.batches import MicroBatch
from pipeline.methods.companion import Companion
from pipeline.methods.driver import drive
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.objective import LOGGED_FIELDS, STATS
from pipeline.methods.registry import method_of
from pipeline.train import checkpoint, vanishing
from pipeline.train.distributed import report
from pipeline.train.resume import TrainState

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.train.config import RunConfig


class TrainingAborted(Exception):
    """Training cannot go on (e.g. the loss stays non-finite); the last checkpoint is intact."""


def train_step(
    engine: DeepSpeedEngine,
    micro_batches: list[MicroBatch],
    *,
    adversarial,
    step: int,
    companion: Companion | None = None,
    carries: list[ReplayPerturbation] | None = None,
) -> Tensor:
    """This rank's summed `STATS` of the step (then the method's extras), on the device. The
    `companion` (SMART's teacher, ASA's adversaries) is updated after the optimizer step;
    FreeAT's `carries` (one per micro-batch) hold the perturbations its next replay starts from."""
    sums = None
    method = method_of(adversarial)
    backward = accumulating_backward(engine, len(micro_batches) * method.passes(step))
    lr = engine.get_lr()[0]  # this step's, before engine.step() moves the schedule on
    for i, batch in enumerate(micro_batches):
        batch = batch.on(engine.device)

        def forward(delta):
            return engine(batch.input_ids, batch.attention_mask, batch.masked_index, delta)

        def ascent_forward(delta):
            return engine.module(batch.input_ids, batch.attention_mask, batch.masked_index, delta)[0]

        def module_forward(module):
            return module(batch.input_ids, batch.attention_mask, batch.masked_index)[0]

        out = drive(
            adversarial,
            step=step,
            forward=forward,
            ascent_forward=ascent_forward,
            labels=batch.labels,
            backward=backward,
            real_tokens=batch.attention_mask,
            companion=companion,
            module_forward=module_forward,
            carry=carries[i] if carries else None,
        )
        engine.step()
        sums = out.stats() if sums is None else sums + out.stats()
    if companion is not None:
        companion.after_step(engine.module, lr)
        extras = method.step_extras(companion, step)  # means per micro-batch, as the sums are
        sums = torch.cat([sums, *(extra * len(micro_batches) for extra in extras)])
    return sums


def accumulating_backward(engine: DeepSpeedEngine, count: int):
    """`engine.backward` for the `count` backward passes of one optimizer step, the last one
    marked as the gradient-accumulation boundary. Each loss is divided by DeepSpeed's
    gradient_accumulation_steps (the micro-batches), not by the passes: a method's yielded
    losses sum to its objective."""
    left = count

    def backward(loss: Tensor) -> None:
        nonlocal left
        left -= 1
        engine.set_gradient_accumulation_boundary(left == 0)
        engine.backward(loss)

    return backward


@dataclass(frozen=True)
class StepStats:
    """A step's numbers over all ranks: losses and sizes as means per micro-batch."""

    loss: float
    loss_mlm: float
    loss_adv: float
    delta_norm: float
    adv_grad_norm: float
    delta_lost: float
    nonfinite: bool  # some rank's loss was not finite
    adv_skipped: bool  # some rank dropped its adversarial term
    stop: bool  # some rank was asked to stop
    extras: tuple[float, ...] = ()  # the method's own numbers, means per micro-batch (`Method.stat_names`)

    @classmethod
    def gather(cls, sums: Tensor, stop: bool) -> StepStats:
        """All-reduce every rank's sums and stop request, and read them back once. NaN-safe:
        a non-finite loss stays visible."""
        vector = torch.cat([sums, sums.new_tensor([float(stop)])])
        dist.all_reduce(vector)
        values = vector.tolist()
        total = dict(zip(STATS, values))
        micro = total["micro_batches"]
        means = {name: total[name] / micro for name in LOGGED_FIELDS}
        return cls(
            **means,
            nonfinite=total["nonfinite"] > 0,
            adv_skipped=total["adv_skipped"] > 0,
            stop=values[-1] > 0,
            extras=tuple(v / micro for v in values[len(STATS) : -1]),
        )

    def adv_ratio(self, alpha: float) -> float:
        """alpha * L_adv / L_mlm: the adversarial term's share of the loss."""
        return alpha * self.loss_adv / self.loss_mlm if self.loss_mlm > 0 else 0.0


def advance_state(state: TrainState, stats: StepStats, config: RunConfig, engine: DeepSpeedEngine) -> None:
    """Count the step just done into `state`. An update that was applied although the loss
    was not finite (ZeRO stage 0 in fp32 cannot skip it) stops the run at once."""
    adv = config.adversarial
    active = adv.active(state.step)
    state.step += 1
    state.consumed_samples = consumed_after(config, state.step, state.consumed_samples)
    state.adv_skipped += int(stats.adv_skipped)
    state.bad_streak = state.bad_streak + 1 if stats.nonfinite else 0
    if stats.nonfinite and engine.was_step_applied():
        raise TrainingAborted(
            f"step {state.step}: non-finite loss and this configuration (ZeRO stage 0, fp32) cannot skip the update"
        )
    if active:
        counts = not stats.adv_skipped and vanishing.vanished(adv, stats.adv_ratio(adv.alpha), stats.delta_lost)
        state.vanish_streak = state.vanish_streak + 1 if counts else 0


def consumed_after(config: RunConfig, steps_done: int, consumed: int) -> int:
    """The samples consumed once ``steps_done`` optimizer steps are done, from ``consumed``
    before the last of them: a global batch a step, FreeAT's once a batch's last replay is
    done. It needs no stats, so the trainer knows the next step's batch before this step's
    read-back (`pipeline.train.prefetch`)."""
    if method_of(config.adversarial).at_boundary(steps_done):
        return consumed + config.train.global_batch_size
    return consumed


def check_health(state: TrainState, stats: StepStats, config: RunConfig, run_dir) -> None:
    """After the step is logged: say once that the adversarial term vanished (or stop on it),
    and stop (TrainingAborted) when the loss has stayed non-finite too long."""
    adv = config.adversarial
    vanishing.check(
        adv,
        streak=state.vanish_streak,
        step=state.step,
        ratio=stats.adv_ratio(adv.alpha),
        lost=stats.delta_lost,
        announce=report,
    )
    if state.bad_streak > config.train.max_bad_steps:
        last, _ = checkpoint.latest_complete(run_dir)
        raise TrainingAborted(
            f"step {state.step}: non-finite loss for {state.bad_streak} steps in a row "
            f"(train.max_bad_steps={config.train.max_bad_steps}); "
            f"the last good checkpoint is {last or 'none'}"
        )
