"""Training on a weighted mixture of shard directories, in a sample order that is a pure
function of (seed, global sample index).

The mixture is one virtual dataset: source s's row r has the id ``offset[s] + r``, where the
offsets concatenate the sources. Global sample k is placed like this:

- Sources. The stream is cut into blocks of BLOCK samples. Each block holds a fixed number
  of slots per source, the weights rounded to BLOCK by largest remainder (so a source's
  share is exact over every whole block, within 1/BLOCK of its weight), in a seeded order
  of their own (`pipeline.data.sampling.permute`, keyed by the block): sample k takes the
  source of slot ``permute(k % BLOCK)`` of block ``k // BLOCK``.
- Rows. Source s's c-th sample (c counts its samples in stream order: ``block * slots[s]``
  plus those earlier in the block) is read in the source's own epochs: row
  ``permute(c % n_s, n_s, seed_s, c // n_s)``, each epoch reshuffled. A source with a larger share than its size repeats; one with a smaller share
  is not read to its end in an epoch of the mixture.

Nothing is materialised beyond one block's table (BLOCK entries, cached); any position
costs the same; the
global batch does not depend on the world size (ranks slice it as for one source), so a
resumed run and a run on another number of ranks read the same batches. The mixture's
epoch, which the mask-rate curriculum follows, is the sources' rows summed: with weights
proportional to size it is one pass over each source.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.data.sampling import hash_parts, permute

BLOCK = 1 << 16  # samples per block: the unit over which the shares are exact
_SOURCE_DOMAIN = 0x534F55524345  # "SOURCE": keeps the sources' orders apart from the slots'


@dataclass(frozen=True)
class MixtureOrder:
    """Where each global sample of a mixture comes from. ``sizes``: rows per source;
    ``weights``: the sources' shares of the samples (any positive numbers; normalised)."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.weights) or not self.sizes:
            raise ValueError("a mixture needs one weight per source, and at least one source")
        if min(self.sizes) < 1 or not all(w > 0 for w in self.weights):
            raise ValueError(f"every source needs rows and a positive weight (sizes {self.sizes}, weights {self.weights})")

    @property
    def slots(self) -> np.ndarray:
        """Samples per block, per source: the weights rounded to BLOCK by largest remainder."""
        exact = np.asarray(self.weights, dtype=np.float64) / sum(self.weights) * BLOCK
        slots = np.floor(exact).astype(np.int64)
        short = BLOCK - int(slots.sum())
        slots[np.argsort(-(exact - slots), kind="stable")[:short]] += 1
        return slots

    @property
    def offsets(self) -> np.ndarray:
        """Each source's first id in the virtual dataset."""
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        """The mixture's epoch: the sources' rows summed."""
        return int(sum(self.sizes))

    def samples(self, start: int, count: int) -> np.ndarray:
        """Virtual ids of global samples ``start .. start + count - 1``."""
        sources, counts = self.placement(np.arange(start, start + count, dtype=np.int64))
        ids = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            where = sources == s
            ids[where] = self.offsets[s] + self._source_rows(int(s), counts[where])
        return ids

    def placement(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global samples ``k``: (the source of each, and how many samples of that source came before it)."""
        slots = self.slots
        blocks, positions = np.divmod(k, BLOCK)
        sources, counts = np.empty_like(k), np.empty_like(k)
        for block in np.unique(blocks):
            where = blocks == block
            source, rank = _block_table(tuple(slots.tolist()), self.seed, int(block))
            sources[where] = source[positions[where]]
            counts[where] = block * slots[sources[where]] + rank[positions[where]]
        return sources, counts

    def consumed(self, samples: int) -> np.ndarray:
        """Samples each source has given once ``samples`` global samples are consumed."""
        blocks, rest = divmod(samples, BLOCK)
        source, _ = _block_table(tuple(self.slots.tolist()), self.seed, blocks)
        return blocks * self.slots + np.bincount(source[:rest], minlength=len(self.sizes))

    def _source_rows(self, source: int, counts: np.ndarray) -> np.ndarray:
        """Rows of ``source`` for its samples number ``counts``, epoch by epoch reshuffled."""
        n = self.sizes[source]
        seed = int(hash_parts(_SOURCE_DOMAIN, self.seed, source)[0] >> np.uint64(1))
        epochs, positions = np.divmod(counts, n)
        rows = np.empty_like(counts)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            rows[where] = permute(positions[where], n, seed, int(epoch))
        return rows


@functools.lru_cache(maxsize=4)
def _block_table(slots: tuple[int, ...], seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position of a block: its source, and how many of that source's samples came
    before it in the block. So a source's samples keep their order within and across blocks,
    and a source's epoch is read whole before its next one starts. Two arrays of BLOCK
    entries, built once per block (cached: a block spans many batches)."""
    bounds = np.cumsum(slots)
    source = np.searchsorted(bounds, permute(np.arange(BLOCK), BLOCK, seed, block), side="right")
    rank = np.empty(BLOCK, dtype=np.int64)
    for s in range(len(slots)):
        where = source == s
        rank[where] = np.arange(int(where.sum()))
    return source, rank
