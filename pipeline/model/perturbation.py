"""Embedding-space perturbations: how big delta starts, how an ascent step moves it, and
whether it survives being added to the embeddings.

Sizes (`noise_std`, `step_size`, `eps`) are in one of two units (`scale`):

- ``relative`` (the default): multiples of each token's embedding RMS,
  ``r_t = ||e_t||_2 / sqrt(H)``. At a LayerNorm output r_t is about 1, so the numbers read as
  they would there; on raw word embeddings (std 0.02 at initialisation) the perturbation
  shrinks with them. The same config therefore means the same thing at either
  `perturb_at`, for any model width, and at any weight scale a checkpoint has grown to.
- ``absolute``: plain numbers, as the paper and the official code write them.

Whatever the unit, a perturbation smaller than the embeddings' rounding step is lost when
added: bf16 keeps 8 significant bits, so an element of size 1 absorbs anything below
about 4e-3. `lost_fraction` measures that on the real tensors, so a run can report it.

Update rules (`update`), per token, with ||.|| the configured norm (linf or l2); each is
named for what it does, and docs/ALUM.md says which source uses it:

- ``normalised`` (alias ``paper``, its name before its source was checked):
  ``delta + step_size * r_t * g / (||g|| + grad_eps)``: a step of length step_size whatever
  the gradient's magnitude: normalised PGD (Madry et al. 2018), the step the project's notes
  on ALUM write (``delta = project_eps(delta + eta * g / ||g||)``); FreeLB's code takes it
  with the norm over a whole sequence instead of per token.
- ``projected``: ``Pi_eps(delta + step_size * r_t * g)``: the unnormalised gradient step,
  then the projection when ``eps`` is set. Issue 24 reports it as what the ALUM paper's
  Algorithm 1 prints (``delta <- Pi_eps(delta + eta * g_adv)``); the project's notes do not
  quote the paper, so that attribution is unchecked here. Its step scales with the gradient,
  which is tiny near delta = 0 (docs/ALUM.md), so it needs a large ``step_size``.
- ``official``: ``r_t * normalise(delta + step_size * g)``, i.e. the sum is rescaled to unit
  length (times r_t): what mt-dnn's pretraining plugin (v0.2 `alum/`) and its fine-tuning
  `SmartPerturbation` do. Delta then always has the length of the embeddings' RMS, and
  when ``step_size * g`` is much smaller than delta its direction is mostly the initial
  noise's.
- ``random``: ``normalised`` with the gradient replaced by Gaussian noise, the noise control
  of issue 24's study: the same passes (the gradient's pass runs, its direction is unused)
  and a delta of the same per-token size as ``normalised`` gives, in a random direction, so
  a comparison with ALUM separates "adversarial" from "perturbed".

`eps`, when set, projects delta onto the per-token ball of radius eps * r_t afterwards.

`norm_over` (``token`` or ``sequence``) says what ||.|| is taken over: each token's H values
(the default), or all T x H values of a sequence at once, as FreeLB's code normalises its
step and clips to ``adv_max_norm``. Over a sequence, sizes stay in units of r_t: the rule and
the projection act on delta / r_t, so with ``scale: absolute`` (r_t = 1) it is FreeLB's code.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMS = ("linf", "l2")
TINY = 1e-30  # a floor for r_t where delta is divided by it
SCALES = ("relative", "absolute")
UPDATES = ("normalised", "projected", "official", "random")
UPDATE_ALIASES = {"paper": "normalised"}
NORM_OVER = ("token", "sequence")  # names configs may still use, and the rule each means


def token_norm(x: Tensor, norm: str) -> Tensor:
    """Per-token norm over the last (hidden) dimension: max |x| for linf, the L2 norm for l2."""
    if norm == "linf":
        return x.abs().amax(dim=-1)
    return torch.linalg.vector_norm(x, dim=-1)


def scoped_norm(x: Tensor, norm: str, over: str) -> Tensor:
    """`token_norm` shaped [B, T, 1] (``over="token"``), or the norm of each sequence's T x H
    values shaped [B, 1, 1] (``over="sequence"``), ready to divide ``x`` by."""
    if over == "token":
        return token_norm(x, norm).unsqueeze(-1)
    if norm == "linf":
        return x.abs().amax(dim=(-2, -1), keepdim=True)
    return torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Perturbations and losses are computed in float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def token_scale(embedded: Tensor, scale: str) -> Tensor:
    """The unit of perturbation sizes for each token, shaped [B, T, 1] (no gradient)."""
    dtype = work_dtype(embedded.dtype)
    if scale == "absolute":
        return torch.ones(*embedded.shape[:-1], 1, dtype=dtype, device=embedded.device)
    return embedded.detach().to(dtype).pow(2).mean(dim=-1, keepdim=True).sqrt()


def initial_noise(embedded: Tensor, unit: Tensor, noise_std: float) -> Tensor:
    """delta ~ N(0, (noise_std * r_t)^2), in float32 even when the model runs in bf16 (drawn in
    float32 for a float64 model too, so both start from the same noise)."""
    return torch.randn(embedded.shape, device=embedded.device).to(unit.dtype) * (noise_std * unit)


def ascent_update(delta: Tensor, grad: Tensor, unit: Tensor, config) -> Tensor:
    """One ascent step on delta by `config.update`, then the optional eps-ball projection."""
    update = UPDATE_ALIASES.get(config.update, config.update)
    over = config.norm_over
    if update == "random":  # from the model's RNG stream, so a resumed run draws the same
        grad, update = torch.randn(grad.shape, device=grad.device).to(grad.dtype), "normalised"
    if update == "normalised":
        if over == "token":
            step = grad / (token_norm(grad, config.norm).unsqueeze(-1) + config.grad_eps)
        else:  # the step on delta / r_t, whose gradient is g * r_t, normalised over the sequence
            scaled = grad * unit
            step = scaled / (scoped_norm(scaled, config.norm, over) + config.grad_eps)
        delta = delta + config.step_size * unit * step
    elif update == "projected":
        delta = delta + config.step_size * unit * grad
    else:
        raw = delta + config.step_size * grad
        if over == "token":
            delta = unit * raw / (token_norm(raw, config.norm).unsqueeze(-1) + config.grad_eps)
        else:
            raw = raw / unit.clamp_min(TINY)
            delta = unit * raw / (scoped_norm(raw, config.norm, over) + config.grad_eps)
    if config.eps is None:
        return delta
    if over == "token":
        return project(delta, config.eps * unit, config.norm)
    return unit * project_sequence(delta / unit.clamp_min(TINY), config.eps, config.norm)


def project(delta: Tensor, radius: Tensor, norm: str) -> Tensor:
    """delta moved into the per-token ball of ``radius`` [B, T, 1] in ``norm``: clipped (linf)
    or scaled down (l2); tokens already inside are left alone."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, radius), -radius)
    norms = token_norm(delta, "l2").unsqueeze(-1)
    return delta * (radius / torch.maximum(norms, radius))


class OnDetached:
    """A delta to add to a detached copy of the embeddings (``adversarial.embedding_grad:
    detached``, as mt-dnn's pretraining plugin adds its noise to ``embed.data.detach()``): the
    pass's gradient reaches delta and the layers after the embeddings, not the embedding layer."""

    def __init__(self, delta):
        self.delta = delta


def project_sequence(delta: Tensor, radius: float, norm: str) -> Tensor:
    """delta [B, T, H] moved into each sequence's ball of ``radius``: clipped element-wise
    (linf: the same ball as per token) or each sequence scaled down as a whole (l2), as
    FreeLB's code applies ``adv_max_norm``."""
    if norm == "linf":
        return delta.clamp(-radius, radius)
    norms = scoped_norm(delta, "l2", "sequence")
    return delta * (radius / torch.clamp(norms, min=radius))


def uniform_start(embedded: Tensor, unit: Tensor, real_tokens: Tensor, init_mag: float, norm: str, generator) -> Tensor:
    """FreeLB's code's random start (``adv_init_mag``), in units of r_t: U(-1, 1) on real
    tokens times ``init_mag / sqrt(length x H)`` per sequence for l2 (so each sequence's
    norm is about init_mag / sqrt(3)), times ``init_mag`` for linf; 0 on padding."""
    u = torch.rand(embedded.shape, generator=generator, device=embedded.device).to(unit.dtype) * 2 - 1
    real = real_tokens.unsqueeze(-1).to(unit.dtype)
    if norm == "l2":
        values = real.sum(dim=(-2, -1), keepdim=True) * embedded.shape[-1]
        magnitude = init_mag / values.clamp_min(1).sqrt()
    else:
        magnitude = torch.full((), init_mag, dtype=unit.dtype, device=unit.device)
    return u * real * magnitude * unit


def lost_fraction(embedded: Tensor, delta: Tensor, real_tokens: Tensor) -> Tensor:
    """Fraction of delta's non-zero elements on real tokens that vanish in ``embedded + delta``
    computed as the model computes it (delta cast to the embeddings' dtype, then added)."""
    e = embedded.detach()
    counted = (delta != 0) & real_tokens.unsqueeze(-1)
    lost = ((e + delta.to(e.dtype)) == e) & counted
    return lost.sum() / counted.sum().clamp(min=1)


def real_mean(values: Tensor, real_tokens: Tensor) -> Tensor:
    """Mean of per-token values [B, T] over real tokens only (padding excluded)."""
    return (values * real_tokens).sum() / real_tokens.sum().clamp(min=1)
