"""The global sample order: seeded, resumable, independent of the number of ranks.

Sample ``k`` of the run (``k`` counts samples across epochs) is
``permute(k % n, n, seed, k // n)``: a pure function of (seed, epoch, position), computed
on demand for just the positions a batch needs. No permutation of the dataset is ever held
in memory (corpora can have 1e9 rows), nothing but ``consumed_samples`` needs to be
checkpointed, and every data-parallel rank derives the same global batch and takes its own
contiguous slice of it, so the sequence of global batches is the same for any world size.

The permutation is a Feistel network over the smallest even bit width covering ``n``,
with cycle walking to stay inside [0, n): a bijection for any round function, vectorised
over numpy arrays. Its round function is the splitmix64 finaliser (`mix64`), which
`pipeline.data.masking` also uses as its counter-based random number generator.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 6
_ORDER_DOMAIN = 0x53414D504C45  # "SAMPLE": keeps these keys apart from the masking streams
MAX_SAMPLES = 1 << 62


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective, well-mixing hash of uint64 arrays.

    numpy wraps uint64 array arithmetic modulo 2**64 without warnings, which is exactly the
    arithmetic the finaliser needs (scalars would warn, so callers pass arrays).
    """
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def _as_u64(value: int | np.ndarray) -> np.ndarray:
    """A Python int or an integer array as uint64, negative values wrapping modulo 2**64."""
    if isinstance(value, np.ndarray):
        return value.astype(np.uint64)
    return np.array([int(value) & _MASK64], dtype=np.uint64)


def hash_parts(*parts: int | np.ndarray) -> np.ndarray:
    """Hash a sequence of keys (ints or broadcastable integer arrays) into uint64.

    Each part is hashed before it is absorbed, so (a, b) and (b, a) or (a + 1, b - 1) give
    unrelated results.
    """
    h = np.zeros(1, dtype=np.uint64)
    for part in parts:
        h = mix64(h ^ mix64(_as_u64(part) + _GOLDEN))
    return h


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Map positions in [0, n) to sample indices: a bijection of [0, n) per (n, seed, epoch)."""
    _check_n(n)
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"positions must be in [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = _round_keys(seed, epoch)
    out = _feistel(positions.astype(np.uint64), half, keys)
    # Cycle walking: re-encrypt values that left [0, n). The domain is < 4n, so few repeats.
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = _feistel(out[outside], half, keys)
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


@functools.lru_cache(maxsize=16)
def _round_keys(seed: int, epoch: int) -> tuple[np.ndarray, ...]:
    """The Feistel round keys of an epoch's permutation (cached: every batch needs them)."""
    return tuple(hash_parts(_ORDER_DOMAIN, seed, epoch, r) for r in range(_FEISTEL_ROUNDS))


def _feistel(x: np.ndarray, half: int, keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """A balanced Feistel network on 2 * half bits: invertible whatever the round function."""
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (mix64(right ^ key) & mask)
    return (left << shift) | right


def global_batch_indices(consumed_samples: int, global_batch_size: int, n: int, seed: int) -> np.ndarray:
    """Sample indices of the global batch starting at ``consumed_samples`` (counted across epochs).

    A batch that runs past the end of an epoch continues with the next epoch's order, so
    no sample is dropped or repeated within an epoch and resuming needs only the count.
    """
    _check_n(n)
    if consumed_samples < 0 or global_batch_size < 1:
        raise ValueError(
            f"need consumed_samples >= 0 and global_batch_size >= 1, got {consumed_samples}, {global_batch_size}"
        )
    k = np.arange(consumed_samples, consumed_samples + global_batch_size, dtype=np.int64)
    epochs, positions = np.divmod(k, n)
    out = np.empty_like(k)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        out[where] = permute(positions[where], n, seed, int(epoch))
    return out


def rank_slice(global_indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous part of the global batch that data-parallel rank ``rank`` processes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    size = len(global_indices)
    if size % world_size:
        raise ValueError(f"global batch of {size} samples does not divide among {world_size} ranks")
    per_rank = size // world_size
    return global_indices[rank * per_rank : (rank + 1) * per_rank]


def epoch_fraction(consumed_samples: int, n: int) -> float:
    """Position within the current epoch in [0, 1): what the mask curriculum is keyed on."""
    _check_n(n)
    return (consumed_samples % n) / n


def sample_digest(indices: np.ndarray) -> str:
    """Which samples, in which order, made up a batch: 16 hex chars of a sha256.

    Logged per step so two runs (or a run and its resumption) can be compared batch by batch.
    """
    data = np.ascontiguousarray(indices, dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _check_n(n: int) -> None:
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"number of samples must be in [1, 2**62], got {n}")
