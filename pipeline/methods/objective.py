"""What every embedding-space adversarial method shares: the clean pass, the dropout replay,
the float32 losses, the guard against non-finite terms, and the numbers a micro-batch logs.

The trainer supplies two callables, so no method knows DeepSpeed's engine or where the
perturbation is added:

- ``forward(delta)`` returns ``(logits [N, C], embedded [B, T, H])``; ``forward(None)`` is the
  clean pass. It goes through ``engine(...)`` so parameter gradients flow. ``delta`` may also
  be a function of the unperturbed embeddings that returns the delta to add (`ZeroDelta`).
- ``ascent_forward(delta)`` returns logits. It goes through ``engine.module(...)``: an
  input-only ``autograd.grad`` through the engine trips DeepSpeed's ZeRO-1/2 gradient hooks.

Shared rules:

- Dropout (``adversarial.dropout: replay``, the default): every pass after the clean one sees
  the clean pass's dropout masks; otherwise an ascent chases the difference between two
  dropout samples instead of the perturbation (FreeLB makes the same point).
  ``independent`` lets every pass draw its own masks, as the official ALUM (mt-dnn) and ASA
  code do. `Replay` captures the RNG before the clean pass and
  restores it before each later pass; the state after the clean pass (and any noise drawn
  right after it) is restored at the end, so the next micro-batch gets fresh masks. This
  holds only if every pass runs the whole model in the same order (delta added by a hook).
- Losses are computed in float32 whatever the logits' dtype (float64 for a float64 model).
- Non-finite ascent gradients or adversarial terms are dropped for the micro-batch (the
  official ALUM behaviour) with ``torch.where``, not a host-side branch, and every pass still
  runs, so all ranks run the same forwards and ZeRO-3's gathers stay in step.
- Logged sizes are averaged over real tokens only; padding has no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.rng import RngState
from pipeline.model import perturbation
from pipeline.model.perturbation import token_norm

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig

Forward = Callable[[Tensor | None], tuple[Tensor, Tensor]]
AscentForward = Callable[[Tensor], Tensor]

LOGGED = {"logged": True}  # the field's value is one of the numbers `StepLosses.stats` sums, under its name


@dataclass(kw_only=True)
class StepLosses:
    """What one micro-batch produced: the loss to backward and the numbers to log, all 0-dim
    tensors on the device, so that nothing waits for the accelerator until the step's stats
    are read back once. Built by keyword: several fields are tensors of the same kind."""

    loss: Tensor = field(metadata=LOGGED)
    loss_mlm: Tensor = field(metadata=LOGGED)  # the clean loss (masked-LM or classification cross-entropy)
    loss_adv: Tensor = field(metadata=LOGGED)  # the method's adversarial term, before its weight; 0 when off or skipped
    delta_norm: Tensor = field(metadata=LOGGED)  # mean per-token norm of the final delta over real tokens
    adv_grad_norm: Tensor = field(metadata=LOGGED)  # mean per-token norm of the last ascent gradient over real tokens
    delta_lost: Tensor = field(metadata=LOGGED)  # fraction of delta's elements that vanish when added to the embeddings
    skipped: Tensor  # bool: the adversarial term was dropped (non-finite)
    extras: Tensor | None = None  # a method's own numbers [E], named by it (ASA: `AttentionAdversaries.stat_names`)

    @classmethod
    def clean(cls, loss_mlm: Tensor) -> StepLosses:
        zero = torch.zeros((), device=loss_mlm.device)
        return cls(
            loss=loss_mlm,
            loss_mlm=loss_mlm,
            loss_adv=zero,
            delta_norm=zero,
            adv_grad_norm=zero,
            delta_lost=zero,
            skipped=torch.zeros((), dtype=torch.bool, device=loss_mlm.device),
        )

    def stats(self) -> Tensor:
        """The numbers of `STATS`, then the extras, as one float64 vector, still on the device (no host sync)."""
        vector = torch.stack([getattr(self, name).detach().double() for name in LOGGED_FIELDS])
        flags = torch.stack([~torch.isfinite(self.loss.detach()), self.skipped]).double()
        extras = [] if self.extras is None else [self.extras.detach().double()]
        return torch.cat([vector, flags, vector.new_ones(1), *extras])


# The per-micro-batch numbers a step sums and all-reduces, in `StepLosses.stats` order: the
# logged fields, whether the loss was not finite, whether the term was skipped, and a 1 that
# counts the micro-batch.
LOGGED_FIELDS = tuple(f.name for f in fields(StepLosses) if f.metadata.get("logged"))
STATS = (*LOGGED_FIELDS, "nonfinite", "adv_skipped", "micro_batches")


@dataclass
class CleanPass:
    """The clean pass and what the methods build on it."""

    logits: Tensor
    log_probs: Tensor  # computed once, shared by the clean loss and the methods' terms
    loss: Tensor
    embedded: Tensor  # the unperturbed embeddings delta is added to [B, T, H]
    real_tokens: Tensor  # bool [B, T]
    replay: Replay


class Replay:
    """The dropout replay (module doc): `start()` before the clean pass, `mark()` once the
    clean pass and any noise draws are done, `again()` before every later pass, `finish()`.
    ``dropout="independent"`` (``adversarial.dropout``) makes all four do nothing: every pass
    then draws its own masks, as the official ALUM and ASA code's passes do."""

    def __init__(self, dropout: str = "replay"):
        self.replays = dropout == "replay"

    def start(self) -> Replay:
        if self.replays:
            self.clean = RngState.capture()
        return self

    def mark(self) -> None:
        if self.replays:
            self.after = RngState.capture()

    def again(self) -> None:
        if self.replays:
            self.clean.restore()

    def finish(self) -> None:
        if self.replays:
            self.after.restore()


class ZeroDelta:
    """delta = 0 (or ``start(embedded)``, FreeLB's random start), made by the perturbation hook
    in the shape of the embeddings it is added to (unknown before the first pass), as a leaf:
    the trainer's backward of that pass leaves the gradient with respect to delta on `tensor`.
    (Reading it off the embeddings instead, with `retain_grad`, fails under ZeRO-3, whose
    module hooks re-wrap the tensors.)"""

    def __init__(self, start: Callable[[Tensor], Tensor] | None = None):
        self.tensor: Tensor | None = None
        self.start = start

    def __call__(self, embedded: Tensor) -> Tensor:
        dtype = perturbation.work_dtype(embedded.dtype)
        if self.start is None:
            self.tensor = torch.zeros(embedded.shape, dtype=dtype, device=embedded.device, requires_grad=True)
        else:
            self.tensor = self.start(embedded).detach().to(dtype).requires_grad_(True)
        return self.tensor


def clean_pass(
    forward: Forward,
    labels: Tensor,
    real_tokens: Tensor | None,
    delta: ZeroDelta | None = None,
    dropout: str = "replay",
) -> CleanPass:
    """The clean pass; with a `ZeroDelta`, one whose backward gives the gradient at delta = 0.
    ``dropout``: ``adversarial.dropout``, whether later passes replay this one's masks (`Replay`)."""
    replay = Replay(dropout).start()
    logits, embedded = forward(delta)
    log_p = log_probs(logits)
    real_tokens = every_token_or(real_tokens, embedded)
    return CleanPass(logits, log_p, nll(log_p, labels), embedded, real_tokens, replay)


def every_token_or(real_tokens: Tensor | None, embedded: Tensor) -> Tensor:
    """``real_tokens`` (the attention mask) as bool [B, T]; None means every token of ``embedded`` is real."""
    if real_tokens is None:
        return torch.ones(embedded.shape[:-1], dtype=torch.bool, device=embedded.device)
    return real_tokens.bool()


def input_gradient(loss_of: Callable[[Tensor], Tensor], logits: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """(d loss_of(logits) / d delta, zeroed if not finite; whether it was finite), delta alone.

    Through an fp16 model this gradient would underflow: the loss's gradient at the logits is
    about 1 / (rows x classes) per element (1e-9 for 600 masked tokens and a 30k vocabulary),
    below fp16's smallest subnormal (6e-8), and DeepSpeed's loss scaler never sees an ascent.
    So it is taken in two parts: the loss's gradient at the logits in float32, scaled by the
    power of two that brings its largest element into [1, 2), goes back through the model,
    and the result is divided by the same power. Scaling by a power of two is exact, so in
    float32 and bf16 (fp32's range) the result equals the unscaled gradient bit for bit."""
    wide = logits.to(perturbation.work_dtype(logits.dtype))
    (at_logits,) = torch.autograd.grad(loss_of(wide), wide)
    # No scored row (no masked token) has nothing to scale, but still runs the backward: ZeRO-3 gathers in it.
    largest = at_logits.abs().amax() if at_logits.numel() else at_logits.new_ones(())
    largest = largest.clamp_min(torch.finfo(at_logits.dtype).tiny)
    scale = torch.exp2(torch.floor(torch.log2(largest)))
    (grad,) = torch.autograd.grad(wide, delta, grad_outputs=at_logits / scale)
    return finite_or_zero(grad.to(scale.dtype) * scale)


def finite_or_zero(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(grad in the work dtype, or zeros if any element is not finite; whether it was finite)."""
    grad = grad.to(perturbation.work_dtype(grad.dtype))
    finite = torch.isfinite(grad).all()
    return torch.where(finite, grad, torch.zeros_like(grad)), finite


def backward_gradient(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """`finite_or_zero` of the gradient the trainer's backward left on ``tensor``, a delta: a
    multi-pass method's ascent direction comes from the same backward as the parameter
    gradients. That gradient carries the trainer's scaling (DeepSpeed divides by the
    accumulation steps, fp16 multiplies by its loss scale): the sign step and the ``paper``
    rule normalise it away; the ``official`` rule adds it to delta as it is."""
    if tensor.grad is None:
        raise RuntimeError(
            "no gradient reached the perturbation: backward each loss an objective yields before asking for the next"
        )
    return finite_or_zero(tensor.grad)


def guarded(term: Callable[[Tensor], Tensor], logits: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
    """(term(logits), or exactly 0 where it must be dropped; whether it was kept). Dropped
    when ``finite`` is False (a non-finite ascent gradient) or the logits or the term are not
    finite. Non-finite logits are replaced before the term, not after: a NaN term masked
    to 0 still sends NaN gradients back through the adversarial pass."""
    logits_finite = torch.isfinite(logits)
    safe = torch.where(logits_finite, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    value = term(safe)
    keep = finite & logits_finite.all() & torch.isfinite(value)
    return torch.where(keep, value, torch.zeros_like(value)), keep


def adversarial_delta(delta: Tensor, config: AdversarialConfig) -> Tensor | perturbation.OnDetached:
    """``delta`` as the adversarial pass adds it: to a detached copy of the embeddings under
    ``adversarial.embedding_grad: detached`` (mt-dnn's pretraining plugin), so that no gradient
    of the term reaches the embedding layer; to the embeddings themselves under ``full``."""
    return perturbation.OnDetached(delta) if config.embedding_grad == "detached" else delta


def perturbation_stats(clean: CleanPass, delta: Tensor, grad: Tensor, norm: str) -> dict[str, Tensor]:
    """The `StepLosses` fields that describe the perturbation, by name: delta's and the
    gradient's mean per-token norms over real tokens, the fraction of delta lost to rounding."""
    return perturbation_stats_at(clean.embedded, clean.real_tokens, delta, grad, norm)


def perturbation_stats_at(
    embedded: Tensor, real_tokens: Tensor, delta: Tensor, grad: Tensor, norm: str
) -> dict[str, Tensor]:
    """`perturbation_stats` for a method without a separate clean pass."""
    return {
        "delta_norm": perturbation.real_mean(token_norm(delta, norm), real_tokens),
        "adv_grad_norm": perturbation.real_mean(token_norm(grad, norm), real_tokens),
        "delta_lost": perturbation.lost_fraction(embedded, delta, real_tokens),
    }


def perturbation_radius(config: AdversarialConfig) -> float:
    """A gradient method's perturbation size, in units of `perturbation.token_scale`:
    ``adversarial.eps``, or ``step_size`` when eps is null."""
    return config.eps if config.eps is not None else config.step_size


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the N scored rows (logits [N, C], labels [N]).

    A batch with no masked token gives a zero that still depends on ``logits``, so the
    trainer's backward (and DeepSpeed's gradient hooks) run as on any other step.
    """
    return nll(log_probs(logits), labels)


def symmetric_kl(p_logits: Tensor, q_logits: Tensor, kl_grad: str = "detached") -> Tensor:
    """KL(p||q) + KL(q||p) summed over the classes, averaged over the N rows. ``detached``
    (mt-dnn's ``SymKlCriterion``) stops the gradient through each direction's target;
    ``full`` differentiates everything (pipeline.methods.alum says what that changes)."""
    return symmetric_kl_of(log_probs(p_logits), log_probs(q_logits), kl_grad)


def log_probs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.to(perturbation.work_dtype(logits.dtype)), dim=-1)


def nll(log_probs: Tensor, labels: Tensor) -> Tensor:
    if labels.numel() == 0:
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, labels)


def kl(target_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """KL(target || q) from log-probabilities, summed over the classes, mean over rows."""
    total = F.kl_div(log_probs, target_log_probs, reduction="sum", log_target=True)
    return total / max(log_probs.shape[0], 1)


def symmetric_kl_of(log_p: Tensor, log_q: Tensor, kl_grad: str) -> Tensor:
    if kl_grad == "full":
        return kl(log_p, log_q) + kl(log_q, log_p)
    return kl(log_p.detach(), log_q) + kl(log_q.detach(), log_p)
