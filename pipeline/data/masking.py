"""Dynamic BERT masking whose outcome depends only on (seed, step, sample index, position).

Masks are drawn fresh at every step (dynamic masking, as in RoBERTa) at the rate the
curriculum gives. Instead of a stateful RNG, every token gets counter-based random numbers:
``hash(seed, step, global sample index, position, stream)`` with the splitmix64 finaliser.
A row therefore masks identically whatever batch, micro-batch or rank it lands in and
whatever its neighbours are, a resumed run masks exactly like an uninterrupted one, and
there is no RNG state to checkpoint. It is also fast: a handful of vectorised uint64
operations per token, no per-row generator.

Rules (BERT): each maskable token is selected with probability ``rate``; a selected token
becomes ``mask_id`` (80%), a uniformly random non-special id (10%) or stays as it is (10%).
``special_ids`` and ``mask_id`` itself are never selected and never drawn as random
replacements. A row with any maskable token always gets at least one selected token (its
maskable token with the smallest selection draw), so the MLM loss is never empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.sampling import hash_parts, mix64

_MASK_DOMAIN = 0x4D41534B  # "MASK": keeps these keys apart from the sample order's
# One constant per independent stream of draws for the same token.
_SELECT, _KIND, _RANDOM_ID = (np.uint64(c) for c in (0x5E1EC7, 0x8010_10, 0x0A11D))
_MASK_SHARE, _RANDOM_SHARE = 0.8, 0.1
_TO_UNIT = 2.0**-53


@dataclass(frozen=True)
class MaskVocab:
    """What masking needs to know of the vocabulary: the ids it never selects or draws,
    the id that replaces a masked token, and padding (not a real token)."""

    special_ids: tuple[int, ...]
    mask_id: int
    pad_id: int
    vocab_size: int

    @classmethod
    def of(cls, tokenizer) -> MaskVocab:
        """From a loaded tokenizer (`data_prep.tokenizer_dir.TokenizerInfo`)."""
        specials = tokenizer.special_token_ids
        return cls(tuple(specials.values()), specials["mask"], specials["pad"], tokenizer.vocab_size)


@dataclass
class MaskedBatch:
    """A masked batch: the corrupted input and what the model must predict where."""

    input_ids: np.ndarray  # int64 [B, T], the corrupted input
    masked: np.ndarray  # bool [B, T], True where a token was selected for prediction
    labels: np.ndarray  # int64 [N], original ids where `masked`, in row-major order


def mask_tokens(
    input_ids: np.ndarray, sample_indices: np.ndarray, *, step: int, seed: int, rate: float, vocab: MaskVocab
) -> MaskedBatch:
    """Mask a [B, T] batch whose rows are the dataset's samples ``sample_indices`` [B]."""
    original = np.asarray(input_ids).astype(np.int64)
    sample_indices = np.asarray(sample_indices, dtype=np.int64)
    vocab_size = vocab.vocab_size
    _check(original, sample_indices, rate, vocab_size)
    excluded = np.unique(np.asarray([*vocab.special_ids, vocab.mask_id], dtype=np.int64))
    maskable = ~np.isin(original, excluded)

    base = _token_hashes(seed, step, sample_indices, original.shape[1])
    draws = _uniform(base, _SELECT)
    selected = maskable & (draws < rate)
    _select_at_least_one(selected, maskable, draws)

    kind = _uniform(base, _KIND)
    to_mask = selected & (kind < _MASK_SHARE)
    to_random = selected & (kind >= _MASK_SHARE) & (kind < _MASK_SHARE + _RANDOM_SHARE)
    corrupted = original.copy()
    corrupted[to_mask] = vocab.mask_id
    corrupted[to_random] = _random_ids(_uniform(base[to_random], _RANDOM_ID), excluded, vocab_size)
    return MaskedBatch(input_ids=corrupted, masked=selected, labels=original[selected])


def _check(input_ids: np.ndarray, sample_indices: np.ndarray, rate: float, vocab_size: int) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {input_ids.shape}")
    if sample_indices.shape != input_ids.shape[:1]:
        raise ValueError(f"sample_indices must have shape ({input_ids.shape[0]},), got {sample_indices.shape}")
    if not 0 < rate <= 1:
        raise ValueError(f"mask rate must be in (0, 1], got {rate}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"input ids must be in [0, {vocab_size})")


def _token_hashes(seed: int, step: int, sample_indices: np.ndarray, seq_len: int) -> np.ndarray:
    """uint64 [B, T]: one hash per (seed, step, sample index, position), the root of all streams."""
    positions = np.arange(seq_len, dtype=np.int64)[None, :]
    return hash_parts(_MASK_DOMAIN, seed, step, sample_indices[:, None], positions)


def _uniform(base: np.ndarray, stream: np.uint64) -> np.ndarray:
    """Independent uniform floats in [0, 1) per token for each stream (53 random bits)."""
    return (mix64(base ^ stream) >> np.uint64(11)).astype(np.float64) * _TO_UNIT


def _select_at_least_one(selected: np.ndarray, maskable: np.ndarray, draws: np.ndarray) -> None:
    """In place: rows with maskable tokens but no selection get their lowest-draw maskable token."""
    empty = maskable.any(axis=1) & ~selected.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        cols = np.where(maskable[rows], draws[rows], np.inf).argmin(axis=1)
        selected[rows, cols] = True


def _random_ids(draws: np.ndarray, excluded: np.ndarray, vocab_size: int) -> np.ndarray:
    """Map uniform draws to ids uniform over [0, vocab_size) minus ``excluded`` (sorted, unique).

    Draw r in [0, allowed) and return the r-th allowed id: r plus the number of excluded
    ids at or below it, found by binary search, so no vocabulary-sized array is built.
    """
    excluded = excluded[(excluded >= 0) & (excluded < vocab_size)]
    allowed = vocab_size - len(excluded)
    if allowed < 1:
        raise ValueError(f"no token id in [0, {vocab_size}) is left for random replacement")
    r = np.minimum((draws * allowed).astype(np.int64), allowed - 1)
    return r + np.searchsorted(excluded - np.arange(len(excluded)), r, side="right")
