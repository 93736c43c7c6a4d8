"""The ALUM objective: masked-LM loss plus a virtual-adversarial symmetric-KL term.

One step (Liu et al. 2020; docs/ALUM.md in this repository):

    p            = clean logits at the masked positions        -> L_mlm
    delta        ~ N(0, (noise_std * r)^2), shaped like the perturbed embeddings
    K times:       g     = d KL(stopgrad(p) || q(delta)) / d delta      (delta only, no parameter grads)
                   delta = update(delta, g)                              (pipeline.perturbation)
    L_adv        = KL(p || q) + KL(q || p)   at delta.detach()
    loss         = L_mlm + alpha * L_adv

The trainer supplies two callables, so this file knows nothing of DeepSpeed's engine or of
where the perturbation is added:

- ``forward(delta)`` returns ``(masked logits [N, V], embedded [B, T, H])``; ``forward(None)``
  is the clean pass. It goes through ``engine(...)`` so parameter gradients flow.
- ``ascent_forward(delta)`` returns masked logits. It goes through ``engine.module(...)``:
  running an input-only ``autograd.grad`` through the engine trips DeepSpeed's ZeRO-1/2
  gradient-reduction hooks.

Choices, and which source each follows:

- Sizes and the update rule live in `pipeline.perturbation` (relative or absolute units;
  the paper's or the official code's rule). The defaults come from bench/alum_term.py
  (docs/alum-term.md): the official code's magnitudes (step 1e-3, noise 1e-5, normaliser
  epsilon 1e-6) make the term numerically zero in float32 and exactly zero in bf16.
- ``kl_grad``: ``detached`` (default, as mt-dnn's ``SymKlCriterion``) computes
  KL(stopgrad(p) || q) + KL(stopgrad(q) || p), so each logit tensor is pulled towards the
  other and no gradient flows through a softmax used as a target. Near q = p that is half
  the gradient of the symmetric KL itself (each direction contributes the same first-order
  term, and detaching drops one of them): alpha = 10 detached acts like alpha = 5 in the
  paper's formula. ``full`` differentiates both directions completely.
- ``eps=None`` (the default) skips the projection, as the official pretraining code does.
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
- Logged sizes (delta and gradient norms, the fraction of delta lost to rounding) are
  averaged over real tokens only; padding has no gradient and would dilute them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import checks, perturbation
from pipeline.rng import RngState
from pipeline.perturbation import NORMS, SCALES, UPDATES, token_norm

METHODS = ("none", "alum")
PERTURB_AT = ("word_embeddings", "embedding_output")
KL_GRADS = ("detached", "full")
ON_VANISH = ("warn", "error")

Forward = Callable[[Tensor | None], tuple[Tensor, Tensor]]
AscentForward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AdversarialConfig:
    """The ``adversarial`` config section; docs/ALUM.md says where each default comes from."""

    method: str = "none"
    start_step: int = 0
    alpha: float = 10.0
    steps: int = 1
    update: str = "paper"
    scale: str = "relative"
    step_size: float = 1e-1
    noise_std: float = 1e-2
    eps: float | None = None
    norm: str = "linf"
    grad_eps: float = 1e-12
    perturb_at: str = "embedding_output"
    kl_grad: str = "detached"
    vanish_ratio: float = 1e-5
    vanish_steps: int = 10
    on_vanish: str = "warn"

    def __post_init__(self) -> None:
        """A bad setting fails where the config is built, naming the field (the loader adds ``adversarial.``)."""
        checks.choice("method", self.method, METHODS)
        checks.choice("update", self.update, UPDATES)
        checks.choice("scale", self.scale, SCALES)
        checks.choice("norm", self.norm, NORMS)
        checks.choice("perturb_at", self.perturb_at, PERTURB_AT)
        checks.choice("kl_grad", self.kl_grad, KL_GRADS)
        checks.choice("on_vanish", self.on_vanish, ON_VANISH)
        checks.integer("start_step", self.start_step, minimum=0)
        checks.integer("steps", self.steps, minimum=1)
        checks.integer("vanish_steps", self.vanish_steps, minimum=1)
        checks.number("alpha", self.alpha)
        checks.number("step_size", self.step_size)
        checks.number("noise_std", self.noise_std)
        checks.number("grad_eps", self.grad_eps, positive=True)
        checks.number("vanish_ratio", self.vanish_ratio)
        if self.eps is not None:
            checks.number("eps", self.eps, positive=True)

    def active(self, step: int) -> bool:
        """Whether the adversarial term is on at this optimizer step (standard phase first)."""
        return self.method != "none" and step >= self.start_step


# The per-micro-batch numbers a step sums and all-reduces, in `StepLosses.stats` order.
STATS = ("loss", "loss_mlm", "loss_adv", "delta_norm", "adv_grad_norm", "delta_lost", "nonfinite", "adv_skipped", "micro_batches")


@dataclass
class StepLosses:
    """What one micro-batch produced: the loss to backward and the numbers to log, all 0-dim
    tensors on the device, so that nothing waits for the accelerator until the step's stats
    are read back once."""

    loss: Tensor
    loss_mlm: Tensor
    loss_adv: Tensor  # the symmetric KL, before alpha; 0 when off or skipped
    delta_norm: Tensor  # mean per-token norm of the final delta over real tokens
    adv_grad_norm: Tensor  # mean per-token norm of the last ascent gradient over real tokens
    delta_lost: Tensor  # fraction of delta's elements that vanish when added to the embeddings
    skipped: Tensor  # bool: the adversarial term was dropped (non-finite)

    @classmethod
    def clean(cls, loss_mlm: Tensor) -> StepLosses:
        zero = torch.zeros((), device=loss_mlm.device)
        return cls(loss_mlm, loss_mlm, zero, zero, zero, zero, torch.zeros((), dtype=torch.bool, device=loss_mlm.device))

    def stats(self) -> Tensor:
        """The numbers of `STATS` as one float64 vector, still on the device (no host sync)."""
        values = (self.loss, self.loss_mlm, self.loss_adv, self.delta_norm, self.adv_grad_norm, self.delta_lost)
        vector = torch.stack([v.detach().double() for v in values])
        flags = torch.stack([~torch.isfinite(vector[0]), self.skipped]).double()
        return torch.cat([vector, flags, vector.new_ones(1)])


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the N masked tokens (logits [N, V], labels [N]).

    A batch with no masked token gives a zero that still depends on ``logits``, so the
    trainer's backward (and DeepSpeed's gradient hooks) run as on any other step.
    """
    return _nll(_log_probs(logits), labels)


def symmetric_kl(p_logits: Tensor, q_logits: Tensor, kl_grad: str = "detached") -> Tensor:
    """KL(p||q) + KL(q||p) summed over the vocabulary, averaged over the N masked tokens.

    ``detached`` (the official code's ``SymKlCriterion``) stops the gradient through each
    direction's target distribution; ``full`` differentiates everything (see the module doc).
    """
    return _symmetric_kl(_log_probs(p_logits), _log_probs(q_logits), kl_grad)


def compute_losses(
    forward: Forward,
    ascent_forward: AscentForward,
    labels: Tensor,
    config: AdversarialConfig,
    step: int,
    real: Tensor | None = None,
) -> StepLosses:
    """One micro-batch's losses: the clean MLM loss, plus alpha times the ALUM term when active.

    ``real`` marks real tokens [B, T] (the attention mask); None means every token is real.
    Calls no ``backward``: the ascent gradient is taken with ``torch.autograd.grad`` with
    respect to delta alone, so the trainer's single backward of ``loss`` is the only one.
    No host sync: a non-finite gradient or term is dropped with ``torch.where``.
    """
    replay = RngState.capture()
    p_logits, embedded = forward(None)
    # Each [N, V] log-softmax is computed once and shared by the MLM loss and both KLs.
    log_p = _log_probs(p_logits)
    loss_mlm = _nll(log_p, labels)
    if not config.active(step):
        return StepLosses.clean(loss_mlm)

    real = torch.ones(embedded.shape[:-1], dtype=torch.bool, device=embedded.device) if real is None else real.bool()
    unit = perturbation.token_scale(embedded, config.scale)
    delta = perturbation.initial_noise(embedded, unit, config.noise_std)
    after_noise = RngState.capture()
    target = log_p.detach()
    finite = torch.ones((), dtype=torch.bool, device=embedded.device)
    for _ in range(config.steps):
        replay.restore()
        delta.requires_grad_(True)
        kl = _kl(target, _log_probs(ascent_forward(delta)))
        (grad,) = torch.autograd.grad(kl, delta)
        grad_finite = torch.isfinite(grad).all()
        finite = finite & grad_finite
        grad = torch.where(grad_finite, grad, torch.zeros_like(grad))
        delta = perturbation.ascent_update(delta.detach(), grad, unit, config)

    replay.restore()
    q_logits, _ = forward(delta.detach())
    after_noise.restore()
    loss_adv, keep = _guarded_symmetric_kl(log_p, q_logits, finite, config.kl_grad)
    delta_norm = perturbation.real_mean(token_norm(delta, config.norm), real)
    grad_norm = perturbation.real_mean(token_norm(grad, config.norm), real)
    lost = perturbation.lost_fraction(embedded, delta, real)
    loss = loss_mlm + config.alpha * loss_adv
    return StepLosses(loss, loss_mlm, loss_adv.detach(), delta_norm, grad_norm, lost, ~keep)


def _guarded_symmetric_kl(log_p: Tensor, q_logits: Tensor, finite: Tensor, kl_grad: str) -> tuple[Tensor, Tensor]:
    """(the symmetric KL, or exactly 0 where it must be dropped; whether it was kept).
    Dropped when the ascent gradient (``finite`` False) or the adversarial logits are not
    finite. Non-finite logits are replaced before the KL, not after: a NaN term multiplied
    or masked to 0 still sends NaN gradients back through the adversarial pass."""
    logits_finite = torch.isfinite(q_logits)
    safe_q = torch.where(logits_finite, q_logits, torch.zeros((), dtype=q_logits.dtype, device=q_logits.device))
    kl = _symmetric_kl(log_p, _log_probs(safe_q), kl_grad)
    keep = finite & logits_finite.all() & torch.isfinite(kl)
    return torch.where(keep, kl, torch.zeros_like(kl)), keep


def _log_probs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.to(perturbation.work_dtype(logits.dtype)), dim=-1)


def _nll(log_probs: Tensor, labels: Tensor) -> Tensor:
    if labels.numel() == 0:
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, labels)


def _kl(target_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """KL(target || q) from log-probabilities, summed over the vocabulary, mean over tokens."""
    total = F.kl_div(log_probs, target_log_probs, reduction="sum", log_target=True)
    return total / max(log_probs.shape[0], 1)


def _symmetric_kl(log_p: Tensor, log_q: Tensor, kl_grad: str) -> Tensor:
    if kl_grad == "full":
        return _kl(log_p, log_q) + _kl(log_q, log_p)
    return _kl(log_p.detach(), log_q) + _kl(log_q.detach(), log_p)
