"""Counting host syncs: the operations that make the host wait for the accelerator.

On a GPU, `.item()`, `bool(tensor)`, `torch.equal`, an operation whose output size depends
on the data (`nonzero`, a boolean-mask gather or assignment, `unique`, `bincount`,
`repeat_interleave` without an output size) or `.tolist()` stall the host until the device
catches up. On CPU nothing stalls, but the same operations still pass through PyTorch's
dispatcher, so a `TorchDispatchMode` sees them here as it would there, in every library's
code. Each one is attributed to the innermost calling frame outside torch, so the project's
syncs can be told from DeepSpeed's or transformers' own. What it cannot see on a CPU: a copy
to the host (`.cpu()`, `.numpy()`), which copies nothing when the tensor is already there,
and whether an `.item()` reads a tensor that lives on the host anyway (no sync on a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TORCH_DIR = str(Path(torch.__file__).parent)
aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostSyncs(TorchDispatchMode):
    """Records in order, while active, every sync ("sync", file:line, op), every `.tolist()`
    read-back ("read_back", file:line, "tolist") and every `mark` ("mark", file:line, label)."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str, str]] = []
        self._tolist = torch.Tensor.tolist

    @property
    def syncs(self) -> list[tuple[str, str]]:
        return [(where, op) for kind, where, op in self.events if kind == "sync"]

    @property
    def read_backs(self) -> list[str]:
        return [where for kind, where, _ in self.events if kind == "read_back"]

    def mark(self, label: str) -> None:
        """Note a point of the run (e.g. "batch 3 built") between the syncs around it."""
        self.events.append(("mark", _caller(), label))

    def __enter__(self):
        counter = self

        def tolist(tensor):
            counter.events.append(("read_back", _caller(), "tolist"))
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if func in SYNC_OPS or bool_index:
            self.events.append(("sync", _caller(), str(func)))
        return func(*args, **kwargs)


def _caller() -> str:
    """file:line of the innermost frame that is neither torch's nor this module's."""
    frame = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
