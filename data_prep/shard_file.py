"""Writing one group of units as its shard files: one Arrow file per split.

`GroupWriter` packs the units' token streams (`data_prep.packing`) in order and writes the
rows through `ShardWriter`: an Arrow IPC stream of fixed-length rows in fixed-size record
batches, under a temporary name until it is complete (`data_prep.atomic`). Its `close`
returns the group's progress record: shards with row counts and sha256, and the stats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep import atomic, manifest
from data_prep.corpus import Piece
from data_prep.packing import Packer
from data_prep.work_units import SPLITS, UnitTokens

ROWS_PER_RECORD_BATCH = 1024


class GroupWriter:
    """The shard files of group `index`, fed its units' tokens in unit order."""

    def __init__(self, out: Path, index: int, *, units: list[Piece], seq_len: int, ids: dict[str, int], dtype: str):
        self.index, self.units = index, units
        self.writers = {split: ShardWriter(out / split / f"{index:06d}.arrow", seq_len, dtype) for split in SPLITS}
        self.packers = {split: Packer(seq_len, ids["cls"], ids["sep"], ids["pad"], dtype) for split in SPLITS}
        self.stats = dict.fromkeys(manifest.STAT_KEYS, 0)

    def add(self, tokens: UnitTokens) -> None:
        for split in SPLITS:
            self.writers[split].write(self.packers[split].add(tokens.streams[split]))
        for key, value in tokens.stats.items():
            self.stats[key] += value

    def close(self) -> dict:
        shards = []
        for split in SPLITS:
            self.writers[split].write(self.packers[split].finish())
            shard = self.writers[split].close(padding=self.packers[split].padding)
            if shard:
                shards.append({"split": split, "path": f"{split}/{self.index:06d}.arrow", **shard})
        self.stats["padding_tokens"] = sum(p.padding for p in self.packers.values())
        first, last = self.units[0], self.units[-1]
        return {
            "piece": self.index,
            "source": {
                "first": {"path": first.file.path, "start": first.start},
                "last": {"path": last.file.path, "end": last.end},
            },
            "shards": shards,
            "stats": {**self.stats, "sequences": sum(s["num_rows"] for s in shards)},
        }

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


class ShardWriter:
    """An Arrow IPC stream of fixed-length rows, written in fixed-size record batches."""

    def __init__(self, path: Path, seq_len: int, dtype):
        self.path, self.seq_len, self.dtype = path, seq_len, dtype
        self.schema = manifest.shard_schema(seq_len, dtype)
        self.value_type = self.schema.field("input_ids").type.value_type
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.rows = 0
        self.writer = None

    def write(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(rows)
            self.pending_rows += len(rows)
        while self.pending_rows >= ROWS_PER_RECORD_BATCH:
            block = np.concatenate(self.pending)
            self._emit(block[:ROWS_PER_RECORD_BATCH])
            rest = block[ROWS_PER_RECORD_BATCH:]
            self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def _emit(self, rows: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = atomic.temporary_name(self.path)
            self.sink = pa.OSFile(str(self.tmp), "wb")
            self.writer = pa.ipc.new_stream(self.sink, self.schema)
        # From the raw buffer: `pa.array(ndarray)` would import pandas (half a second per worker).
        flat = np.ascontiguousarray(rows).reshape(-1)
        values = pa.Array.from_buffers(self.value_type, len(flat), [None, pa.py_buffer(flat)])
        column = pa.FixedSizeListArray.from_arrays(values, self.seq_len)
        self.writer.write_batch(pa.record_batch([column], schema=self.schema))
        self.rows += len(rows)

    def abort(self) -> None:
        """Drop the unfinished file of a piece that failed."""
        if self.writer is not None:
            self.sink.close()
            self.tmp.unlink(missing_ok=True)
            self.writer = None

    def close(self, padding: int) -> dict | None:
        """Finish the file under its final name; None when the piece had no rows for it."""
        if self.pending_rows:
            self._emit(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        if self.writer is None:
            return None
        self.writer.close()
        self.sink.close()
        atomic.publish(self.tmp, self.path)
        return {
            "num_rows": self.rows,
            "num_tokens": self.rows * self.seq_len - padding,
            "bytes": self.path.stat().st_size,
            "sha256": manifest.file_sha256(self.path),
        }
