"""Adversarial self-attention (ASA; Wu et al., "Adversarial Self-Attention for Language
Understanding", AAAI 2023): an adversary per layer learns which attention units to mask so
as to change the model's prediction most, and the model learns to be robust to it.

Per attacked layer l, an `Adversary` scores every (query, key) pair of the layer's input
hidden states, detached from the model: S = Q K^T / sqrt(H) with single-head projections
H -> H, padding keys at -10000. The keep-mask M is 1 where S > 0 and 0 elsewhere in the
forward pass, with the gradient of sigmoid(S) in the backward pass (`StraightThroughMask`).
The released code calls this Gumbel but adds the noise and subtracts it again, so it is a
deterministic threshold; that is the default here (``adversarial.asa.gumbel: false``), and
``true`` samples the mask (logistic noise, the difference of two Gumbels, added before the
threshold). M enters the layer's attention as an additive bias, 0 where kept and -10000
where masked, through the attention implementation ``asa_sdpa`` registered with the
installed transformers (SDPA plus the bias; no copied model files).

One micro-batch (`asa_pass`): a clean pass, then the adversarial pass with the clean pass's
dropout masks and the adversaries' masks, and

    loss = L_clean + alpha * 0.5 * [KL(p || p_adv) + KL(p_adv || p)] + tau^2 * kept,

kept = the units M keeps, summed over the attacked layers, per example (tau = 0.5). A
gradient reversal between each adversary and its M makes the one backward train the model
to minimise the KL and the adversary to maximise the KL plus tau^2 * kept: masking changes
the prediction but costs kept units, so tau sets the masking budget. The penalty's value
depends on the adversaries alone (their input is detached): it is left out of the logged
loss. The KL is over the rows the method scores: masked tokens in pretraining, examples in
fine-tuning; its weight is ``adversarial.alpha`` (the paper's is 1, `alum finetune`'s default).

Differences from the released code: the adversarial pass replays the clean pass's dropout
(every method here does, so the KL measures the mask alone); the adversaries keep their own
AdamW at the model's learning rate instead of sharing the model's optimizer, so the model's
checkpoints, ZeRO partitions and exports are those of a plain BERT/RoBERTa and a standard
run's checkpoint can start an ASA run (`pipeline.methods.companion`); a query row whose keys are all
masked attends over its real keys by its scores (the released code: uniformly over all).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from data_prep.errors import UserError
from pipeline.core import checks
from pipeline.methods.method import Method
from pipeline.methods.objective import Forward, StepLosses, clean_pass, guarded, log_probs, symmetric_kl_of

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig

IMPLEMENTATION = "asa_sdpa"
MASKED = -10000.0  # the released code's bias on a masked unit


@dataclass(frozen=True)
class AsaConfig:
    """The ``adversarial.asa`` section; the start is ``adversarial.start_step``, as for every method."""

    tau: float = 0.5  # the masking budget: the adversary is paid tau^2 per kept unit
    layers: str | int = "all"  # the attacked layers: all, or indices from 0 such as "0,1,2"
    gumbel: bool = False  # false: the released code's deterministic threshold; true: a sampled mask

    def __post_init__(self) -> None:
        checks.number("tau", self.tau)
        if self.layers != "all":
            self._indices()

    def _indices(self) -> tuple[int, ...]:
        try:
            indices = tuple(int(part) for part in str(self.layers).split(","))
        except ValueError:
            raise ValueError(f"layers: expected all or layer indices such as 0,1,2, got {self.layers!r}") from None
        if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"layers: indices must be distinct and >= 0, got {self.layers!r}")
        return tuple(sorted(indices))

    def layer_indices(self, count: int) -> tuple[int, ...]:
        """The attacked layers of a model with ``count`` layers."""
        if self.layers == "all":
            return tuple(range(count))
        indices = self._indices()
        if indices[-1] >= count:
            raise UserError(
                f"adversarial.asa.layers: layer {indices[-1]} does not exist (the model has {count} layers, 0 to "
                f"{count - 1})"
            )
        return indices


class StraightThroughMask(torch.autograd.Function):
    """Forward: 1 where the score is > 0, else 0 (exactly); backward: sigmoid's gradient."""

    @staticmethod
    def forward(ctx, scores: Tensor) -> Tensor:
        ctx.save_for_backward(scores)
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (scores,) = ctx.saved_tensors
        soft = torch.sigmoid(scores)
        return grad * soft * (1 - soft)


class GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward: the adversary ascends what the model descends."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


class Adversary(nn.Module):
    """One layer's adversary: the keep-mask M [B, T, T] of that layer's attention."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor, real_tokens: Tensor, noise: Tensor | None = None) -> Tensor:
        """``hidden`` [B, T, H] (detached here), ``real_tokens`` bool [B, T], ``noise`` the sampled
        variant's [B, T, T]."""
        hidden = hidden.detach().to(self.query.weight.dtype)
        scores = self.query(hidden) @ self.key(hidden).transpose(-1, -2) / math.sqrt(hidden.shape[-1])
        scores = scores + torch.where(real_tokens, 0.0, MASKED)[:, None, :].to(scores.dtype)
        if noise is not None:
            scores = scores + noise
        return GradientReversal.apply(StraightThroughMask.apply(scores))


def attention_modules(hf_model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of an HF BERT/RoBERTa, in layer order."""
    found = [m for m in hf_model.modules() if type(m).__name__.endswith("SelfAttention") and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


class AttentionAdversaries:
    """The adversaries of the attacked layers, attached to an HF model, and their optimizer.

    Outside `active`, the model runs as it is (``asa_sdpa`` is then plain SDPA); inside,
    each attacked layer's attention gets its adversary's mask, and `masks` holds them for the
    penalty and the stats. The adversaries are float32 and replicated on every rank: their
    gradients are averaged over the ranks before each update (`after_step`), so all ranks
    keep the same adversaries; their state goes into the checkpoints' client state."""

    CLIENT_KEY = "asa_adversaries"

    def __init__(
        self, hf_model: nn.Module, config: AdversarialConfig, weight_decay: float = 0.01, grad_clip: float = 1.0
    ):
        """``config``: the ``adversarial.asa`` section; the layers are checked against the model."""
        register()
        modules = attention_modules(hf_model)
        self.layers, self.gumbel, self.grad_clip = config.layer_indices(len(modules)), config.gumbel, grad_clip
        self.adversaries = nn.ModuleList([Adversary(hf_model.config.hidden_size) for _ in self.layers])
        for index, adversary in zip(self.layers, self.adversaries):
            modules[index].register_forward_pre_hook(self._hook(adversary, index), with_kwargs=True)
        hf_model.set_attn_implementation(IMPLEMENTATION)
        self.optimizer = torch.optim.AdamW(self.adversaries.parameters(), lr=0.0, weight_decay=weight_decay)
        self.grad_norm = torch.zeros(())
        self.masks: dict[int, Tensor] = {}
        self._real_tokens: Tensor | None = None
        self._noise: dict[int, Tensor] = {}

    def stat_names(self) -> list[str]:
        """The names of `asa_pass`'s extra numbers, then the adversaries' gradient norm."""
        return ["asa/penalty", *(f"asa/masked_fraction/layer{i}" for i in self.layers), "asa/grad_norm"]

    def to(self, device, dtype: torch.dtype = torch.float32) -> AttentionAdversaries:
        """Onto the model's device; the adversaries stay float32 whatever the model's `dtype`."""
        self.adversaries.to(device)
        self.grad_norm = self.grad_norm.to(device)
        return self

    def start(self, student: nn.Module) -> None:
        """A run that does not resume starts with freshly initialised adversaries."""

    @torch.no_grad()
    def after_step(self, student: nn.Module, lr: float) -> None:
        """Average the gradients over the ranks, clip them as the model's (train.grad_clip),
        and take one AdamW step at the model's learning rate; nothing before ASA starts."""
        params = list(self.adversaries.parameters())
        if all(p.grad is None for p in params):
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
        self.grad_norm = flat.norm()
        if self.grad_clip > 0:
            flat *= (self.grad_clip / (self.grad_norm + 1e-6)).clamp(max=1.0)
        for p, grad in zip(params, flat.split([p.numel() for p in params])):
            p.grad = grad.view_as(p)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {
            "adversaries": {k: v.detach().cpu().clone() for k, v in self.adversaries.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.adversaries.load_state_dict(state["adversaries"])
        self.optimizer.load_state_dict(state["optimizer"])

    def draw_noise(self, real_tokens: Tensor) -> None:
        """The sampled variant's logistic noise for the next active pass, drawn now: outside
        the adversarial pass, whose dropout replays the clean pass's RNG."""
        if self.gumbel:
            batch, length = real_tokens.shape
            shape = (len(self.layers), batch, length, length)
            uniform = torch.rand(shape, device=real_tokens.device).clamp(1e-6, 1 - 1e-6)
            self._noise = dict(zip(self.layers, torch.log(uniform) - torch.log1p(-uniform)))

    @contextlib.contextmanager
    def active(self, real_tokens: Tensor):
        """Forwards inside attack the model with masks of the real tokens ``real_tokens`` [B, T] (bool or 0/1)."""
        self._real_tokens, self.masks = real_tokens.bool(), {}
        try:
            yield self
        finally:
            self._real_tokens, self._noise = None, {}

    def _hook(self, adversary: Adversary, index: int):
        def hook(module, args, kwargs):
            if self._real_tokens is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = adversary(hidden, self._real_tokens, self._noise.get(index))
            self.masks[index] = mask
            module.asa_bias = ((1 - mask) * MASKED)[:, None]  # [B, 1, T, T], over the heads
            return None

        return hook

    def penalty(self) -> Tensor:
        """kept: the units the masks keep, summed over the layers, per example."""
        return sum(m.sum() for m in self.masks.values()) / self._batch()

    def masked_fractions(self, real_tokens: Tensor) -> Tensor:
        """Per attacked layer, the fraction of (real query, real key) units masked [L]."""
        pairs = real_tokens.float()[:, :, None] * real_tokens.float()[:, None, :]
        return torch.stack([1 - (self.masks[i].detach() * pairs).sum() / pairs.sum().clamp_min(1) for i in self.layers])

    def _batch(self) -> int:
        return next(iter(self.masks.values())).shape[0]


def asa_pass(
    forward: Forward, labels: Tensor, config: AdversarialConfig, real_tokens: Tensor | None, masks: AttentionAdversaries
) -> Generator[Tensor, None, StepLosses]:
    """One micro-batch of ASA: yields the loss to backward (penalty included), returns its numbers."""
    clean = clean_pass(forward, labels, real_tokens, dropout=config.dropout)
    masks.draw_noise(clean.real_tokens)
    clean.replay.mark()
    clean.replay.again()
    with masks.active(clean.real_tokens):
        adv_logits, _ = forward(None)
        penalty = config.asa.tau**2 * masks.penalty()
        fractions = masks.masked_fractions(clean.real_tokens)
    clean.replay.finish()
    kl, kept = guarded(
        lambda q: 0.5 * symmetric_kl_of(clean.log_probs, log_probs(q), "full"),
        adv_logits,
        torch.ones((), dtype=torch.bool),
    )
    loss = clean.loss + config.alpha * kl
    yield loss + penalty
    zero = torch.zeros((), device=loss.device)
    return StepLosses(
        loss=loss,
        loss_mlm=clean.loss,
        loss_adv=kl,
        delta_norm=zero,
        adv_grad_norm=zero,
        delta_lost=zero,
        skipped=~kept,
        extras=torch.cat([penalty.detach().reshape(1), fractions]),
    )


def asa_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs
):
    """SDPA with the layer's pending ASA bias, if any. Without one (the standard phase, every
    clean pass, evaluation) the call is plain SDPA's, mask as given: no padding means no mask,
    which on a GPU keeps the flash kernel for the whole run. Only an attacked pass (inside
    `AttentionAdversaries.active`) adds the bias to the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bias = module.__dict__.pop("asa_bias", None)
    if bias is not None:
        attention_mask = biased(attention_mask, bias.to(query.dtype))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def biased(attention_mask: Tensor | None, bias: Tensor) -> Tensor:
    """The additive float mask of ``attention_mask`` (None: nothing masked) plus ``bias``
    [B, 1, T, T], floored at the dtype's lowest value: a padding key's lowest plus -10000
    would be -inf in fp16, and a row of -inf gives NaN."""
    if attention_mask is None:
        return bias
    lowest = torch.finfo(bias.dtype).min
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, lowest)
    return (attention_mask.to(bias.dtype) + bias).clamp_min(lowest)


def register() -> None:
    """Make ``asa_sdpa`` known to transformers: the attention function and, so that the model
    still builds its padding mask, SDPA's mask function under the same name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, asa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


class Asa(Method):
    """``asa``: the attention adversaries (`AttentionAdversaries`, its companion) against the model."""

    name = "asa"
    driven = True  # its backwarded loss holds the adversaries' penalty, which the logged loss leaves out
    keeps_state = True

    def companion(self, model, hf_model, weight_decay, grad_clip) -> AttentionAdversaries:
        """Hooked into the model's attention before ZeRO-3 shards it."""
        return AttentionAdversaries(hf_model, self.config.asa, weight_decay, grad_clip)

    def objective_args(self, companion, module_forward) -> dict:
        return {"adversaries": companion}

    def check(self, run_config, model_config) -> None:
        """What adversarial.method=asa cannot run with, before the model is built."""
        self.config.asa.layer_indices(model_config.num_hidden_layers)
        if run_config.model.activation_checkpointing:
            raise UserError(
                "adversarial.method=asa: model.activation_checkpointing must be false "
                "(the recomputed layers would run without the adversaries' masks)"
            )
        if run_config.train.precision == "fp16":
            raise UserError(
                "adversarial.method=asa: train.precision=fp16 is not supported (the adversaries' gradients "
                "would carry the loss scale); use bf16 or fp32"
            )

    def stat_names(self, companion) -> list[str]:
        return companion.stat_names()

    def step_extras(self, companion, step: int) -> list[Tensor]:
        """The adversaries' gradient norm of the step, once they are in play."""
        return [companion.grad_norm.double().reshape(1)] if self.active(step) else []

    def driven_losses(self, forward, labels, real_tokens, carry, adversaries) -> Generator[Tensor, None, StepLosses]:
        if adversaries is None:
            raise ValueError("adversarial.method=asa needs the model's AttentionAdversaries (pipeline.methods.asa)")
        return (yield from asa_pass(forward, labels, self.config, real_tokens, adversaries))
