"""Training data: memory-mapped shards, the global sample order, masked micro-batches.

Every rank memory-maps the shard files (the OS shares the pages; no rank holds the dataset
in RAM) and computes the same global batch from `consumed_samples` (`pipeline.data.sampling`),
takes its own contiguous slice, and masks it with the counter-based `pipeline.data.masking`.
So the batch a rank sees is a pure function of (seed, consumed samples, step, rank, world
size), and the global batch does not depend on the world size at all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from data_prep import manifest
from data_prep.errors import UserError
from pipeline.data.masking import MaskVocab, mask_tokens
from pipeline.data.sampling import global_batch_indices, rank_slice


class ShardDataset:
    """The rows of one split of a shard directory, memory-mapped."""

    def __init__(self, directory: str | Path, split: str):
        self.directory = Path(directory)
        self.manifest = manifest.read(self.directory)
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.directory}: no {split!r} split (splits: {', '.join(self.manifest['splits'])})")
        self.seq_len = self.manifest["seq_len"]
        self.entries = self.manifest["splits"][split]["shards"]
        self.blocks: list[np.ndarray] = []
        starts = [0]
        for entry in self.entries:
            for block in self._open(entry):
                self.blocks.append(block)
                starts.append(starts[-1] + len(block))
        self.starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self, entry: dict) -> list[np.ndarray]:
        """The shard's blocks, checked against the manifest without reading every byte."""
        schema = manifest.shard_schema(self.seq_len, self.manifest["dtype"])
        table = manifest.read_shard(manifest.shard_path(self.directory, entry), entry, schema)
        return [np.asarray(chunk.flatten()).reshape(-1, self.seq_len) for chunk in table.column("input_ids").chunks]

    def batch_indices(self, consumed_samples: int, count: int, seed: int) -> np.ndarray:
        """Row indices of the global batch that starts at ``consumed_samples`` (`pipeline.data.sampling`)."""
        return global_batch_indices(consumed_samples, count, len(self), seed)

    def verify_checksums(self, rank: int = 0, world_size: int = 1) -> None:
        """sha256 of this rank's share of the shards (catches altered bytes of the right size)."""
        for entry in self.entries[rank::world_size]:
            manifest.check_sha256(manifest.shard_path(self.directory, entry), entry)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at the given global indices, as an int64 array [len(indices), seq_len]."""
        block_ids = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for i, (block, index) in enumerate(zip(block_ids, indices)):
            out[i] = self.blocks[block][index - self.starts[block]]
        return out


@dataclass
class MicroBatch:
    """What the training step copies to the device; nothing it does not use."""

    input_ids: torch.Tensor  # long [b, T], masked
    attention_mask: torch.Tensor | None  # long [b, T]; None when no row has padding (packed rows: every token real)
    masked_index: torch.Tensor  # long [N], the masked tokens as flat indices into b * T (no host sync to gather them)
    labels: torch.Tensor  # long [N]

    @property
    def masked(self) -> torch.Tensor:
        """bool [b, T], True where the loss is taken: `masked_index` as a mask, for evaluation
        and inspection (training needs only the index)."""
        flat = torch.zeros(self.input_ids.numel(), dtype=torch.bool, device=self.input_ids.device)
        return flat.index_fill(0, self.masked_index, True).view_as(self.input_ids)

    def pin(self) -> MicroBatch:
        """The same batch in page-locked host memory (needs an accelerator, e.g. CUDA), which
        `on` copies asynchronously: the host goes on without waiting for the copy."""
        return MicroBatch(*(None if t is None else t.pin_memory() for t in self._tensors()))

    def on(self, device) -> MicroBatch:
        """The same batch with every tensor on ``device``, copied without blocking the host
        (from pinned memory an asynchronous copy; from pageable memory, as a plain one)."""
        return MicroBatch(*(None if t is None else t.to(device, non_blocking=True) for t in self._tensors()))

    def _tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass
class StepBatches:
    global_indices: np.ndarray  # the step's global batch of sample indices, the same on every rank
    micro_batches: list[MicroBatch]  # this rank's share of it, masked
    dataset_size: int  # rows in the split (a mixture's: its sources' summed): an epoch


class Batches:
    """One rank's training batches: what stays fixed for a run is given once, and each
    step's batches follow from (step, consumed samples, mask rate) alone. ``pin_memory``
    (CUDA only) builds them in page-locked memory, for asynchronous copies to the device."""

    def __init__(
        self,
        dataset,  # a ShardDataset, or a pipeline.data.mixture.Mixture: rows(), batch_indices(), len()
        vocab: MaskVocab,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        self.dataset, self.vocab, self.seed = dataset, vocab, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory

    def for_step(self, step: int, consumed_samples: int, rate: float) -> StepBatches:
        global_indices = self.dataset.batch_indices(consumed_samples, self.global_batch_size, self.seed)
        local = rank_slice(global_indices, self.rank, self.world_size)
        micro = self.micro_batch_size
        batches = [
            masked_batch(self.dataset, local[i : i + micro], step=step, seed=self.seed, rate=rate, vocab=self.vocab)
            for i in range(0, len(local), micro)
        ]
        return StepBatches(
            global_indices, [b.pin() for b in batches] if self.pin_memory else batches, len(self.dataset)
        )


def masked_batch(
    dataset: ShardDataset, indices: np.ndarray, *, step: int, seed: int, rate: float, vocab: MaskVocab
) -> MicroBatch:
    """The rows at ``indices``, masked. Whether they hold padding is decided here, on the host:
    packed rows have none (only a split's last row is padded), and then the batch carries no
    attention mask, so transformers neither builds one nor asks the device whether it may
    skip it (a host sync per forward)."""
    rows = dataset.rows(indices)
    masked = mask_tokens(rows, indices, step=step, seed=seed, rate=rate, vocab=vocab)
    real_tokens = rows != vocab.pad_id
    return MicroBatch(
        input_ids=torch.from_numpy(masked.input_ids),
        attention_mask=None if real_tokens.all() else torch.from_numpy(real_tokens.astype(np.int64)),
        masked_index=torch.from_numpy(np.flatnonzero(masked.masked)),
        labels=torch.from_numpy(masked.labels),
    )
