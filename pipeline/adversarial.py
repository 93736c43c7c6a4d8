"""The ALUM objective: masked-LM loss plus a virtual-adversarial symmetric-KL term.

One step (Liu et al. 2020, and ../shared/ALUM.md "One ALUM step"):

    p            = clean logits at the masked positions        -> L_mlm
    delta        ~ N(0, noise_std^2), shaped like the perturbed embeddings
    K times:       g     = d KL(stopgrad(p) || q(delta)) / d delta      (delta only, no parameter grads)
                   delta = project_eps(delta + step_size * g / (||g||_token + grad_eps))
    L_adv        = KL(stopgrad(p) || q) + KL(stopgrad(q) || p)   at delta.detach()
    loss         = L_mlm + alpha * L_adv

The trainer supplies two callables, so this file knows nothing of DeepSpeed's engine or of
where the perturbation is added:

- ``forward(delta)`` returns ``(masked logits [N, V], embedded [B, T, H])``; ``forward(None)``
  is the clean pass. It goes through ``engine(...)`` so parameter gradients flow.
- ``ascent_forward(delta)`` returns masked logits. It goes through ``engine.module(...)``:
  running an input-only ``autograd.grad`` through the engine trips DeepSpeed's ZeRO-1/2
  gradient-reduction hooks (ALUM.md, "DeepSpeed pitfall").

Choices, and which source each follows:

- Step rule: the paper's ``delta + eta * g / ||g||`` (the official fine-tuning code normalises
  ``delta + eta * g`` instead, mt-dnn issue #214). The norm is per token over the hidden
  dimension; ``grad_eps`` is added to it, and since the KL gradient near delta = 0 is tiny,
  ``grad_eps`` sets much of the step size: ``adv_grad_norm`` and ``delta_norm`` are returned so
  a run can show whether the term does anything. (With replayed dropout, delta = 0 is the
  KL's minimum, so the gradient is zero there and scales with the initial noise: on a tiny
  BERT, noise 1e-5 gave per-token gradients near 6e-7, and the default grad_eps=1e-6 cut
  the steps to between 0.4% and 80% of step_size.)
- ``eps=None`` (the default) skips the projection, as the official pretraining code does.
  With the circulated values (eps=1e-5, eta=1e-3) the projection dominates the step.
- Non-finite ascent gradient or adversarial loss: the adversarial term is dropped for the
  step (the official behaviour) and ``StepLosses.skipped`` says so. Every pass still runs,
  so all ranks run the same forwards and ZeRO-3's parameter gathers stay in step.
- Dropout: clean, ascent and adversarial passes see the same dropout masks; otherwise the
  ascent chases the difference between two dropout samples instead of the perturbation
  (FreeLB makes the same point). The RNG state is captured before the clean pass and
  restored before every later pass, so each replays the clean pass's masks. The initial
  noise is drawn after the clean pass, and the state that follows that draw is restored
  at the end, so the next step gets fresh masks. The replay holds only if every pass
  consumes the RNG in the same order as the clean one: each must run the whole model
  (adding delta with a hook, say), not feed a cached embedding into the encoder alone.
- Both KL terms and the MLM loss are computed in float32, whatever the logits' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KEY = "adversarial"
METHODS = ("none", "alum")
NORMS = ("linf", "l2")
PERTURB_AT = ("word_embeddings", "embedding_output")

Forward = Callable[[Tensor | None], tuple[Tensor, Tensor]]
AscentForward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AdversarialConfig:
    """The ``adversarial`` config section; defaults follow the official pretraining code."""

    method: str = "none"
    start_step: int = 0
    alpha: float = 10.0
    steps: int = 1
    step_size: float = 1e-3
    noise_std: float = 1e-5
    eps: float | None = None
    norm: str = "linf"
    grad_eps: float = 1e-6
    perturb_at: str = "embedding_output"

    def validate(self) -> None:
        """Raise ValueError naming the first bad key, so a config error points at its line."""
        _check_choice("method", self.method, METHODS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("perturb_at", self.perturb_at, PERTURB_AT)
        _check_int("start_step", self.start_step, minimum=0)
        _check_int("steps", self.steps, minimum=1)
        _check_number("alpha", self.alpha, positive=False)
        _check_number("step_size", self.step_size, positive=False)
        _check_number("noise_std", self.noise_std, positive=False)
        _check_number("grad_eps", self.grad_eps, positive=True)
        if self.eps is not None:
            _check_number("eps", self.eps, positive=True)

    def active(self, step: int) -> bool:
        """Whether the adversarial term is on at this optimizer step (standard phase first)."""
        return self.method != "none" and step >= self.start_step


@dataclass
class StepLosses:
    """What one training step produced: the loss to backward and the numbers to log."""

    loss: Tensor
    loss_mlm: Tensor
    loss_adv: float
    delta_norm: float
    adv_grad_norm: float
    skipped: bool


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the N masked tokens (logits [N, V], labels [N]).

    A batch with no masked token gives a zero that still depends on ``logits``, so the
    trainer's backward (and DeepSpeed's gradient hooks) run as on any other step.
    """
    return _nll(_log_probs(logits), labels)


def symmetric_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p||q) + KL(q||p) summed over the vocabulary, averaged over the N masked tokens.

    As in the official code (mt-dnn ``SymKlCriterion``), each direction detaches its target
    distribution: the result is KL(stopgrad(p) || q) + KL(stopgrad(q) || p). Each logit tensor
    is thus pulled towards the other, and no gradient flows through a softmax used as a target.
    """
    return _symmetric_kl(_log_probs(p_logits), _log_probs(q_logits))


def token_norm(x: Tensor, norm: str) -> Tensor:
    """Per-token norm over the last (hidden) dimension: max |x| for linf, the L2 norm for l2."""
    if norm == "linf":
        return x.abs().amax(dim=-1)
    return torch.linalg.vector_norm(x, dim=-1)


def ascent_update(delta: Tensor, grad: Tensor, config: AdversarialConfig) -> Tensor:
    """One normalised ascent step on delta, then the optional per-token eps-ball projection."""
    scale = token_norm(grad, config.norm).unsqueeze(-1) + config.grad_eps
    delta = delta + config.step_size * grad / scale
    if config.eps is None:
        return delta
    if config.norm == "linf":
        return delta.clamp(-config.eps, config.eps)
    norms = token_norm(delta, "l2").unsqueeze(-1)
    return delta * (config.eps / norms.clamp(min=config.eps))


def compute_losses(
    forward: Forward,
    ascent_forward: AscentForward,
    labels: Tensor,
    config: AdversarialConfig,
    step: int,
) -> StepLosses:
    """One step's losses: the clean MLM loss, plus alpha times the ALUM term when active.

    Calls no ``backward``: the ascent gradient is taken with ``torch.autograd.grad`` with
    respect to delta alone, so the trainer's single backward of ``loss`` is the only one.
    """
    replay = _RngState.capture()
    p_logits, embedded = forward(None)
    # Each [N, V] log-softmax is computed once and shared by the MLM loss and both KLs.
    log_p = _log_probs(p_logits)
    loss_mlm = _nll(log_p, labels)
    if not config.active(step):
        return StepLosses(loss_mlm, loss_mlm, 0.0, 0.0, 0.0, False)

    delta = torch.randn_like(embedded) * config.noise_std
    after_noise = _RngState.capture()
    target = log_p.detach()
    skipped = False
    for _ in range(config.steps):
        replay.restore()
        delta.requires_grad_(True)
        kl = _kl(target, _log_probs(ascent_forward(delta)))
        (grad,) = torch.autograd.grad(kl, delta)
        if not torch.isfinite(grad).all():
            skipped = True
            grad = torch.zeros_like(grad)
        delta = ascent_update(delta.detach(), grad, config)

    replay.restore()
    q_logits, _ = forward(delta.detach())
    after_noise.restore()
    loss_adv = _symmetric_kl(log_p, _log_probs(q_logits))
    skipped = skipped or not torch.isfinite(loss_adv).item()
    delta_norm = token_norm(delta, config.norm).mean().item()
    grad_norm = token_norm(grad, config.norm).mean().item()
    if skipped:
        return StepLosses(loss_mlm, loss_mlm, 0.0, delta_norm, grad_norm, True)
    loss = loss_mlm + config.alpha * loss_adv
    return StepLosses(loss, loss_mlm, loss_adv.item(), delta_norm, grad_norm, False)


def _log_probs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def _nll(log_probs: Tensor, labels: Tensor) -> Tensor:
    if labels.numel() == 0:
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, labels)


def _kl(target_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """KL(target || q) from log-probabilities, summed over the vocabulary, mean over tokens."""
    total = F.kl_div(log_probs, target_log_probs, reduction="sum", log_target=True)
    return total / max(log_probs.shape[0], 1)


def _symmetric_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return _kl(log_p.detach(), log_q) + _kl(log_q.detach(), log_p)


class _RngState:
    """The CPU generator's state, plus the accelerator's when there is one (dropout's RNG)."""

    def __init__(self, cpu: Tensor, accelerator: Tensor | None) -> None:
        self.cpu = cpu
        self.accelerator = accelerator

    @classmethod
    def capture(cls) -> _RngState:
        from deepspeed.accelerator import get_accelerator  # imported on use: deepspeed is slow to import

        accel = get_accelerator()
        on_device = accel.device_name() != "cpu"
        return cls(torch.get_rng_state(), accel.get_rng_state() if on_device else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().set_rng_state(self.accelerator)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{KEY}.{name}: expected {' or '.join(choices)}, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{KEY}.{name}: expected an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, positive: bool) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{KEY}.{name}: expected a finite number {bound}, got {value!r}")
