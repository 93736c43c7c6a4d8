"""What a trainer asks of a method, answered by one class per method.

`pipeline.methods.registry` names the classes (``adversarial.method``); each lives in its
method's own file, so adding a method is one file and one registry line. A `Method` is
bound to its ``adversarial`` config section and answers:

- `active` and `passes`: whether its term is on at an optimizer step and how many backward
  passes a micro-batch takes then (a DeepSpeed trainer marks only the last as its
  gradient-accumulation boundary);
- `objective`: the micro-batch's losses as a generator (yield each loss to backward, return
  the `StepLosses`), and `compute_losses` for the methods one backward runs (``driven``
  ones need a backward between their losses: `pipeline.methods.driver.drive`);
- `replay_index` and `at_boundary`: whether it replays batches (FreeAT) and where a batch's
  replays end, so the trainer knows the next batch and when a checkpoint may be taken;
- `companion`: the state it keeps beside the model (`pipeline.methods.companion`), and
  `objective_args`, how a micro-batch's objective sees that state;
- `check`: what it cannot run with, before the model is built;
- `stat_names` and `step_extras`: its own logged numbers, after `objective.STATS`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from pipeline.methods.objective import AscentForward, Forward, StepLosses, clean_pass

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig

if TYPE_CHECKING:
    from pipeline.methods.asa import AttentionAdversaries
    from pipeline.methods.companion import Companion
    from pipeline.methods.freeat import ReplayPerturbation

# A micro-batch's logits through another module than the trained one (SMART's teacher).
ModuleForward = Callable[[nn.Module], Tensor]


class Method:
    """The plain method's answers; a method overrides what makes it itself. An adversarial
    method also defines its term: ``losses(clean, forward, ascent_forward, labels, teacher)``
    (one backward), or, with ``driven``, ``driven_losses(forward, labels, real_tokens, carry,
    adversaries)`` yielding each loss to backward (tests/unit/methods/test_method_registry.py
    checks that each registered method has the one it needs)."""

    name: ClassVar[str]
    adversarial: ClassVar[bool] = True  # False for "none": no term at any step
    driven: ClassVar[bool] = False  # needs a backward between its losses: compute_losses cannot run it
    keeps_state: ClassVar[bool] = False  # a companion updated after each optimizer step
    trains_clean: ClassVar[bool] = True  # whether the clean pass is trained on, or only logged (PGD)
    default_steps: ClassVar[int] = 1  # adversarial.steps when left null
    default_norm: ClassVar[str] = "linf"  # adversarial.norm when left null
    detachable: ClassVar[bool] = False  # takes adversarial.embedding_grad: detached (ALUM's term)
    default_norm_over: ClassVar[str] = "token"  # adversarial.norm_over when left null
    default_perturb_at: ClassVar[str] = "embedding_output"  # adversarial.perturb_at when left null
    random_start: ClassVar[bool] = False  # takes adversarial.init_mag (FreeLB's uniform start)

    def __init__(self, config: AdversarialConfig):
        """``config``: the ``adversarial`` section (`pipeline.methods.adversarial.AdversarialConfig`)."""
        self.config = config

    def active(self, step: int) -> bool:
        """Whether the adversarial term is on at this optimizer step (standard phase first)."""
        return self.adversarial and step >= self.config.start_step

    def passes(self, step: int) -> int:
        """Backward passes per micro-batch at this step (1 before adversarial.start_step)."""
        return self.backwards() if self.active(step) else 1

    def backwards(self) -> int:
        """Backward passes per micro-batch while the term is on."""
        return 1

    def replay_index(self, step: int) -> int:
        """Which replay of its batch optimizer step ``step`` is: 0, no method but FreeAT replays."""
        return 0

    def at_boundary(self, steps_done: int) -> bool:
        """Whether ``steps_done`` optimizer steps end a batch's replays (a checkpoint may be taken)."""
        return self.replay_index(steps_done) == 0

    def companion(
        self, model: nn.Module, hf_model: nn.Module, weight_decay: float, grad_clip: float
    ) -> Companion | None:
        """The state kept beside the model, made before ZeRO-3 shards it, or None."""
        return None

    def objective_args(self, companion: Companion | None, module_forward: ModuleForward | None) -> dict:
        """The `objective` keywords through which a micro-batch sees the companion."""
        return {}

    def check(self, run_config, model_config) -> None:
        """Raise a UserError for what this method cannot run with (the run's config, the HF model config)."""

    def stat_names(self, companion: Companion | None) -> list[str]:
        """The names of the extra numbers its `StepLosses.extras` and `step_extras` add, in order."""
        return []

    def step_extras(self, companion: Companion | None, step: int) -> list[Tensor]:
        """Numbers of a whole step (after the companion's update), each a [1] tensor per micro-batch."""
        return []

    def objective(
        self,
        forward: Forward,
        ascent_forward: AscentForward,
        labels: Tensor,
        *,
        step: int,
        real_tokens: Tensor | None = None,
        teacher: Callable[[], Tensor] | None = None,
        carry: ReplayPerturbation | None = None,
        adversaries: AttentionAdversaries | None = None,
    ) -> Generator[Tensor, None, StepLosses]:
        """One micro-batch's losses: yields each to backward, returns its numbers once all are backwarded."""
        if self.driven and self.active(step):
            return (yield from self.driven_losses(forward, labels, real_tokens, carry, adversaries))
        out = self.compute_losses(forward, ascent_forward, labels, step=step, real_tokens=real_tokens, teacher=teacher)
        yield out.loss
        return out

    def compute_losses(
        self,
        forward: Forward,
        ascent_forward: AscentForward,
        labels: Tensor,
        *,
        step: int,
        real_tokens: Tensor | None = None,
        teacher: Callable[[], Tensor] | None = None,
    ) -> StepLosses:
        """The clean loss, plus the term from adversarial.start_step on, for one backward."""
        active = self.active(step)
        if active and self.driven:
            raise ValueError(
                f"adversarial.method={self.name} uses the gradient of its own backward "
                f"({self.passes(step)} per batch): drive it with run_objective(objective(...), backward)"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.trains_clean or not active)):
            clean = clean_pass(forward, labels, real_tokens, dropout=self.config.dropout)
        if not active:
            return StepLosses.clean(clean.loss)
        return self.losses(clean, forward, ascent_forward, labels, teacher)


class Standard(Method):
    """``none``: the masked-LM (or classification) loss alone."""

    name = "none"
    adversarial = False
