"""Training on a weighted mixture of shard directories, in a sample order that is a pure
function of (seed, global sample index).

The mixture is one virtual dataset: source s's row r has the id ``offset[s] + r``, where the
offsets concatenate the sources, so every row has an id of its own (the masks are keyed by
it). Global sample k is placed like this:

- Sources. The stream is cut into blocks of BLOCK samples. Each block holds a fixed number
  of slots per source, the weights rounded to BLOCK by largest remainder (so a source's
  share is exact over every whole block, within 1/BLOCK of its weight), in a seeded order
  of their own (`pipeline.data.sampling.permute`, keyed by the block): sample k takes the
  source of slot ``permute(k % BLOCK)`` of block ``k // BLOCK``.
- Rows. Source s's c-th sample (c counts its samples in stream order: ``block * slots[s]``
  plus those earlier in the block) is read in the source's own epochs: row
  ``permute(c % n_s, n_s, seed_s, c // n_s)``, each epoch reshuffled. A source whose share
  is larger than its size repeats, each repeat in a new order; one whose share is smaller is
  read further into its own epoch as the mixture goes on.

Nothing is materialised beyond one block's table (BLOCK entries, cached); any position
costs the same; the global batch does not depend on the world size (ranks slice it as for
one source), so a resumed run and a run on another number of ranks read the same batches.

The mixture's epoch, which the mask-rate curriculum and ``data/epoch`` follow, is the
sources' rows summed: as many samples as one pass over the concatenated corpora. With
weights proportional to the sizes it is one pass over each source; otherwise each source's
own epochs are counted apart (`MixtureOrder.consumed`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.data.batches import ShardDataset
from pipeline.data.sampling import MAX_SAMPLES, hash_parts, permute

BLOCK = 1 << 16  # samples per block: the unit over which the shares are exact
_SOURCE_DOMAIN = 0x534F55524345  # "SOURCE": keeps the sources' orders apart from the slots'


@dataclass(frozen=True)
class MixtureOrder:
    """Where each global sample of a mixture comes from. ``sizes``: rows per source;
    ``weights``: the sources' shares of the samples (any positive numbers; normalised)."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.weights) or not self.sizes:
            raise ValueError("a mixture needs one weight per source, and at least one source")
        if min(self.sizes) < 1 or not all(w > 0 for w in self.weights) or sum(self.sizes) > MAX_SAMPLES:
            raise ValueError(
                f"every source needs rows and a positive weight: sizes {self.sizes}, weights {self.weights}"
            )

    @functools.cached_property
    def slots(self) -> np.ndarray:
        """Samples per block, per source: the weights rounded to BLOCK by largest remainder."""
        exact = np.asarray(self.weights, dtype=np.float64) / sum(self.weights) * BLOCK
        slots = np.floor(exact).astype(np.int64)
        short = BLOCK - int(slots.sum())
        slots[np.argsort(-(exact - slots), kind="stable")[:short]] += 1
        return slots

    @functools.cached_property
    def slots_key(self) -> tuple[int, ...]:
        """`slots` as the block tables' cache key."""
        return tuple(self.slots.tolist())

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """Each source's first id in the virtual dataset."""
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        """The mixture's epoch: the sources' rows summed."""
        return int(sum(self.sizes))

    def samples(self, start: int, count: int, seed: int) -> np.ndarray:
        """Virtual ids of global samples ``start .. start + count - 1``."""
        if start < 0 or count < 1:
            raise ValueError(f"need start >= 0 and count >= 1, got {start}, {count}")
        sources, counts = self.placement(np.arange(start, start + count, dtype=np.int64), seed)
        ids = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            where = sources == s
            ids[where] = self.offsets[s] + self._source_rows(int(s), counts[where], seed)
        return ids

    def placement(self, k: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """For global samples ``k``: (the source of each, and how many samples of that source came before it)."""
        slots = self.slots
        blocks, positions = np.divmod(k, BLOCK)
        sources, counts = np.empty_like(k), np.empty_like(k)
        for block in np.unique(blocks):
            where = blocks == block
            source, rank = _block_table(self.slots_key, seed, int(block))
            sources[where] = source[positions[where]]
            counts[where] = block * slots[sources[where]] + rank[positions[where]]
        return sources, counts

    def consumed(self, samples: int, seed: int) -> np.ndarray:
        """Samples each source has given once ``samples`` global samples are consumed."""
        blocks, rest = divmod(samples, BLOCK)
        source, _ = _block_table(self.slots_key, seed, blocks)
        return blocks * self.slots + np.bincount(source[:rest], minlength=len(self.sizes))

    def _source_rows(self, source: int, counts: np.ndarray, seed: int) -> np.ndarray:
        """Rows of ``source`` for its samples number ``counts``, epoch by epoch reshuffled."""
        n = self.sizes[source]
        source_seed = _source_seed(seed, source)
        epochs, positions = np.divmod(counts, n)
        rows = np.empty_like(counts)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            rows[where] = permute(positions[where], n, source_seed, int(epoch))
        return rows


@functools.lru_cache(maxsize=64)
def _source_seed(seed: int, source: int) -> int:
    """The seed of a source's own epochs, apart from every other source's and from the slots'."""
    return int(hash_parts(_SOURCE_DOMAIN, seed, source)[0] >> np.uint64(1))


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


class Mixture:
    """The train splits of several shard directories read as one dataset, in `MixtureOrder`:
    what `pipeline.data.batches.Batches` reads in place of one `ShardDataset`. The sources
    must share a seq_len (the train layer checks it, naming the source, before this is built)."""

    def __init__(self, sources: list[ShardDataset], weights: list[float]):
        self.sources = sources
        self.order = MixtureOrder(tuple(len(s) for s in sources), tuple(float(w) for w in weights))
        self.seq_len = sources[0].seq_len

    def __len__(self) -> int:
        return len(self.order)

    def batch_indices(self, consumed_samples: int, count: int, seed: int) -> np.ndarray:
        """Virtual ids of the global batch that starts at ``consumed_samples``."""
        return self.order.samples(consumed_samples, count, seed)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows at the given virtual ids, as an int64 array [len(ids), seq_len]."""
        offsets = self.order.offsets
        sources = np.searchsorted(offsets, ids, side="right") - 1
        out = np.empty((len(ids), self.seq_len), dtype=np.int64)
        for s in np.unique(sources):
            where = sources == s
            out[where] = self.sources[s].rows(ids[where] - offsets[s])
        return out

    def verify_checksums(self, rank: int = 0, world_size: int = 1) -> None:
        for source in self.sources:
            source.verify_checksums(rank, world_size)
