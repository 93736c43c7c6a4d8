"""The perturbed conditions of `alum eval` (`pipeline.tasks.mlm_eval`): the embedding PGD
attack, its random-noise control, and the random draws they and token substitution take.

Every draw comes from a generator keyed by (seed, an offset of its own, row index), so a row
is perturbed alike whatever batch it falls in and a run repeats exactly. A row's PGD start
and noise directions are drawn once and scaled to each radius: radii differ in size alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.methods.pgd import pgd_ascent

SUBSTITUTION_SEED_OFFSET = 104729  # keeps substitution draws unrelated to the masking's
PGD_START_SEED_OFFSET = 1299709  # the PGD start's unrelated to both
NOISE_SEED_OFFSET = 15485863  # and the noise control's signs to all three
PGD_STARTS = ("zero", "random")


def start_directions(indices: np.ndarray, seed: int, start: str, shape, like: Tensor) -> Tensor:
    """PGD's first delta per row [B, *shape] in units of R x r_t: 0 (``zero``), or uniform in
    [-1, 1) (``random``, Madry's start, as training's PGD draws it; inside the ball, so no
    projection), in ``like``'s dtype and on its device."""
    if start == "zero":
        return torch.zeros((len(indices), *shape), dtype=like.dtype, device=like.device)
    return _row_draws(indices, seed, PGD_START_SEED_OFFSET, lambda rng: rng.random(shape) * 2 - 1, like)


def noise_signs(indices: np.ndarray, seed: int, shape, like: Tensor) -> Tensor:
    """A random sign (+-1) per element of each row [B, *shape], the noise control's direction."""
    return _row_draws(indices, seed, NOISE_SEED_OFFSET, lambda rng: rng.integers(2, size=shape) * 2 - 1, like)


def noise_delta(unit: Tensor, signs: Tensor, radius: float) -> Tensor:
    """Each element +-radius x r_t: a random corner of the attack's linf ball, with the linf
    and L2 norm of a saturated PGD delta, so what it costs is what any delta that large costs."""
    return radius * unit * signs


def pgd_logits(model, ids, *, mask, masked_index, labels, start, unit, radius: float, steps: int) -> Tensor:
    """Masked-position logits after training's PGD ascent (`pgd_ascent`: linf, `steps` sign
    steps of 2.5 R / K) from ``start``, on the summed masked-token loss (the sign step does
    not see the scale; the sum keeps the recorded figures)."""
    delta, _, _ = pgd_ascent(
        lambda d: model(ids, mask, masked_index, d)[0],
        lambda logits: F.cross_entropy(logits.float(), labels, reduction="sum"),
        start,
        unit=unit,
        radius=radius,
        steps=steps,
    )
    with torch.no_grad():
        return model(ids, mask, masked_index, delta)[0]


def substitution_draws(indices: np.ndarray, seq_len: int, seed: int, ordinary: Tensor):
    """Per token, a uniform draw (substituted where it is below the rate) and a random
    ordinary id."""
    draws, replacements = [], []
    for rng in _generators(indices, seed, SUBSTITUTION_SEED_OFFSET):
        draws.append(rng.random(seq_len))
        replacements.append(rng.integers(len(ordinary), size=seq_len))
    return torch.from_numpy(np.stack(draws)), ordinary[torch.from_numpy(np.stack(replacements))]


def _generators(indices: np.ndarray, seed: int, offset: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, offset, int(index)]) for index in indices]


def _row_draws(
    indices: np.ndarray, seed: int, offset: int, draw: Callable[[np.random.Generator], np.ndarray], like: Tensor
) -> Tensor:
    """``draw(generator)`` for each row, stacked [B, ...], in ``like``'s dtype and on its device."""
    rows = np.stack([draw(rng) for rng in _generators(indices, seed, offset)])
    return torch.from_numpy(rows).to(dtype=like.dtype, device=like.device)
