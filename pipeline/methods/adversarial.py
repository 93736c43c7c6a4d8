"""The adversarial objectives behind one call, `compute_losses`, and their config section.

`adversarial.method` picks one; all perturb the embeddings through the same mechanics
(`pipeline.methods.objective`: dropout replay, float32 losses, the non-finite guard;
`pipeline.model.perturbation`: units, norms, update rules, projection), and each method's own
file holds only what makes it itself:

- ``alum`` (`pipeline.methods.alum`): the clean loss plus alpha times a virtual-adversarial
  symmetric KL (Liu et al. 2020), the pretraining method this project is built around;
- ``fgsm`` and ``fgm`` (`pipeline.methods.fgm`): one sign / L2 gradient step, clean plus adversarial loss;
- ``pgd`` (`pipeline.methods.pgd`): K projected steps from a random start, adversarial loss alone;
- ``alum_amortized`` (`pipeline.methods.alum`): ALUM's term with the ascent direction taken from the
  clean loss's own backward, so a step costs two forward and two backward passes;
- ``smart`` (`pipeline.methods.smart`): ALUM's term plus a proximal term towards an EMA teacher;
- ``freelb`` and ``yopo`` (`pipeline.methods.accumulated`): parameter gradients accumulated over K
  (or m) passes, the perturbation moved once (or n times) between them;
- ``freeat`` (`pipeline.methods.freeat`): each batch replayed m times, one optimizer step per replay,
  the perturbation carried from replay to replay;
- ``asa`` (`pipeline.methods.asa`): adversarial self-attention, which masks attention units instead
  of perturbing the embeddings: per layer an adversary, trained by gradient reversal in the
  same backward, picks the units whose masking changes the prediction most.

Each method is a class in its own file (`pipeline.methods.method.Method`), named in
`pipeline.methods.registry`; the functions here take the config section and ask its method.
Methods that need nothing after their backward are one `compute_losses` call; the others
(amortized ALUM, FreeLB, YOPO, FreeAT) use the gradient their backward leaves on delta, and
ASA backwards a penalty that only its adversaries see.
Every method is also an `objective`: a generator that yields each loss to backward and
returns the micro-batch's numbers; `run_objective(objective(...), backward)` drives it
(`pipeline.methods.driver.drive` does both for a trainer), and `passes(config, step)` says
how many backward passes it takes (a DeepSpeed trainer marks only the last one as its
gradient-accumulation boundary, so no optimizer step falls inside).

The same call serves pretraining (masked-LM logits of the masked tokens) and fine-tuning
(classification logits, one row per example), from DeepSpeed or from any PyTorch loop: it
imports no DeepSpeed. docs/ALUM.md says where each default comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from torch import Tensor

from pipeline.core import checks
from pipeline.methods.asa import AsaConfig, AttentionAdversaries
from pipeline.methods.driver import run_objective
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.objective import AscentForward, Forward, StepLosses
from pipeline.methods.registry import METHODS, method_of
from pipeline.model.perturbation import NORM_OVER, NORMS, SCALES, UPDATE_ALIASES, UPDATES

__all__ = ["METHODS", "AdversarialConfig", "compute_losses", "objective", "passes", "run_objective"]

PERTURB_AT = ("word_embeddings", "embedding_output")
KL_GRADS = ("detached", "full")
ON_VANISH = ("warn", "error")
EMBEDDING_GRADS = ("full", "detached")
DROPOUTS = ("replay", "independent")


@dataclass(frozen=True)
class AdversarialConfig:
    """The ``adversarial`` config section; docs/ALUM.md says where each default comes from."""

    method: str = "none"
    start_step: int = 0
    alpha: float = 10.0
    steps: int | None = None  # K (ascent steps or passes) or m (YOPO); null: the method's default_steps
    inner_steps: int = 3  # YOPO's n cheap updates per full pass (YOPO-m-n)
    mu: float = 1.0  # SMART's proximal-term weight
    teacher_momentum: float = 0.99  # SMART's beta: the teacher's EMA momentum per optimizer step
    update: str = "normalised"  # `paper` is read as `normalised`
    scale: str = "relative"
    step_size: float = 1e-1
    noise_std: float = 1e-2
    eps: float | None = None
    norm: str | None = None  # null: the method's default_norm
    norm_over: str | None = None  # token | sequence; null: the method's default_norm_over
    init_mag: float | None = None  # FreeLB and YOPO: FreeLB's code's uniform start (adv_init_mag); null: delta_0 = 0
    grad_eps: float = 1e-12
    perturb_at: str | None = None  # null: the method's default_perturb_at (embedding_output; FreeLB word_embeddings)
    kl_grad: str = "detached"
    embedding_grad: str = "full"  # detached: the adversarial pass adds delta to detached embeddings
    dropout: str = "replay"  # independent: every pass draws its own dropout masks
    vanish_ratio: float = 1e-5
    vanish_steps: int = 10
    on_vanish: str = "warn"
    asa: AsaConfig = field(default_factory=AsaConfig)  # method asa only

    def __post_init__(self) -> None:
        """A bad setting fails where the config is built, naming the field (the loader adds ``adversarial.``)."""
        checks.choice("method", self.method, tuple(METHODS))
        if isinstance(self.update, str):
            object.__setattr__(self, "update", UPDATE_ALIASES.get(self.update, self.update))
        checks.choice("update", self.update, UPDATES)
        checks.choice("scale", self.scale, SCALES)
        if self.norm is None:
            object.__setattr__(self, "norm", METHODS[self.method].default_norm)
        checks.choice("norm", self.norm, NORMS)
        if self.norm_over is None:
            object.__setattr__(self, "norm_over", METHODS[self.method].default_norm_over)
        checks.choice("norm_over", self.norm_over, NORM_OVER)
        if self.init_mag is not None:
            checks.number("init_mag", self.init_mag, positive=True)
            if not METHODS[self.method].random_start:
                starts = ", ".join(name for name, method in METHODS.items() if method.random_start)
                raise ValueError(f"init_mag: a random start is for {starts}, not {self.method!r}; leave it null")
        if self.perturb_at is None:
            object.__setattr__(self, "perturb_at", METHODS[self.method].default_perturb_at)
        checks.choice("perturb_at", self.perturb_at, PERTURB_AT)
        checks.choice("kl_grad", self.kl_grad, KL_GRADS)
        checks.choice("on_vanish", self.on_vanish, ON_VANISH)
        checks.choice("embedding_grad", self.embedding_grad, EMBEDDING_GRADS)
        checks.choice("dropout", self.dropout, DROPOUTS)
        if self.embedding_grad == "detached" and not METHODS[self.method].detachable:
            detachable = ", ".join(name for name, method in METHODS.items() if method.detachable)
            raise ValueError(f"embedding_grad: detached is for {detachable} (ALUM's term), not {self.method!r}")
        checks.integer("start_step", self.start_step, minimum=0)
        if self.steps is None:
            object.__setattr__(self, "steps", METHODS[self.method].default_steps)
        checks.integer("steps", self.steps, minimum=1)
        checks.integer("inner_steps", self.inner_steps, minimum=1)
        checks.integer("vanish_steps", self.vanish_steps, minimum=1)
        checks.number("alpha", self.alpha)
        checks.number("step_size", self.step_size)
        checks.number("noise_std", self.noise_std)
        checks.number("grad_eps", self.grad_eps, positive=True)
        checks.number("vanish_ratio", self.vanish_ratio)
        checks.number("mu", self.mu)
        checks.number("teacher_momentum", self.teacher_momentum)
        if not self.teacher_momentum < 1:
            raise ValueError(
                f"teacher_momentum: must be < 1 (1 would freeze the teacher), got {self.teacher_momentum!r}"
            )
        if self.eps is not None:
            checks.number("eps", self.eps, positive=True)

    def active(self, step: int) -> bool:
        """Whether the adversarial term is on at this optimizer step (standard phase first)."""
        return method_of(self).active(step)


def passes(config: AdversarialConfig, step: int) -> int:
    """Backward passes per micro-batch at this step: 2 for amortized ALUM, K for FreeLB, m for
    YOPO, otherwise (and before adversarial.start_step) 1."""
    return method_of(config).passes(step)


def objective(
    forward: Forward,
    ascent_forward: AscentForward,
    labels: Tensor,
    *,
    config: AdversarialConfig,
    step: int,
    real_tokens: Tensor | None = None,
    teacher: Callable[[], Tensor] | None = None,
    carry: ReplayPerturbation | None = None,
    adversaries: AttentionAdversaries | None = None,
) -> Generator[Tensor, None, StepLosses]:
    """One micro-batch's objective as a sequence of losses: yields each loss to backward (their
    sum is the objective) and, once each has been backwarded, returns the `StepLosses`.
    ``teacher``: SMART's teacher forward; ``carry``: FreeAT's perturbation of this micro-batch;
    ``adversaries``: ASA's, attached to the model ``forward`` runs."""
    return method_of(config).objective(
        forward,
        ascent_forward,
        labels,
        step=step,
        real_tokens=real_tokens,
        teacher=teacher,
        carry=carry,
        adversaries=adversaries,
    )


def compute_losses(
    forward: Forward,
    ascent_forward: AscentForward,
    labels: Tensor,
    *,
    config: AdversarialConfig,
    step: int,
    real_tokens: Tensor | None = None,
    teacher: Callable[[], Tensor] | None = None,
) -> StepLosses:
    """One micro-batch's losses: the clean loss, plus the method's adversarial objective from
    ``adversarial.start_step`` on.

    ``real_tokens`` marks real tokens [B, T] (the attention mask); None means every token is real.
    ``teacher`` (SMART only) returns the teacher's clean logits for the same batch.
    Calls no ``backward``: ascent gradients are taken with ``torch.autograd.grad`` with
    respect to delta alone, so the trainer's single backward of ``loss`` is the only one.
    No host sync: a non-finite gradient or term is dropped with ``torch.where``.
    """
    return method_of(config).compute_losses(
        forward, ascent_forward, labels, step=step, real_tokens=real_tokens, teacher=teacher
    )
