"""Packing documents into rows of exactly `seq_len` tokens.

Every row is `[CLS] content [SEP]`; the content is the stream of documents, each followed
by `[SEP]` as a document separator. A document that does not fit continues in the next
row. Only the last row of a stream is padded with `[PAD]` (after its closing `[SEP]`).
So `rows[:, 1:-1]` concatenated and split on `[SEP]` gives back the documents' tokens.
"""

from __future__ import annotations

import numpy as np


class Packer:
    """Turns batches of tokenized documents into full rows, carrying the remainder over."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, dtype):
        self.content_len = seq_len - 2
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.dtype = np.dtype(dtype)
        self.carry = np.empty(0, dtype=self.dtype)
        self.padding = 0

    def add(self, stream: np.ndarray) -> np.ndarray:
        """Append a token stream (documents, each followed by the separator); returns the
        rows it completed, shape (n, seq_len)."""
        stream = np.concatenate([self.carry, stream.astype(self.dtype, copy=False)])
        full = len(stream) // self.content_len * self.content_len
        self.carry = stream[full:]
        return self._frame(stream[:full].reshape(-1, self.content_len))

    def finish(self) -> np.ndarray:
        """The final, padded row (none if nothing is left over)."""
        if not len(self.carry):
            return self._frame(np.empty((0, self.content_len), dtype=self.dtype))
        row = np.full((1, self.content_len + 2), self.pad_id, dtype=self.dtype)
        row[0, 0] = self.cls_id
        row[0, 1 : len(self.carry) + 1] = self.carry
        row[0, len(self.carry) + 1] = self.sep_id
        self.padding += self.content_len - len(self.carry)
        self.carry = self.carry[:0]
        return row

    def _frame(self, content: np.ndarray) -> np.ndarray:
        rows = np.empty((len(content), self.content_len + 2), dtype=self.dtype)
        rows[:, 0] = self.cls_id
        rows[:, 1:-1] = content
        rows[:, -1] = self.sep_id
        return rows
