"""Counting host syncs: the operations that make the host wait for the accelerator.

On a GPU, `.item()`, `bool(tensor)`, a boolean-mask gather (its size is data-dependent:
`nonzero`) or `.tolist()` stall the host until the device catches up. On CPU nothing
stalls, but the same operations still pass through PyTorch's dispatcher, so a
`TorchDispatchMode` sees them here as it would there. Each one is attributed to the
innermost calling frame outside torch, so the project's syncs can be told from
DeepSpeed's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TORCH_DIR = str(Path(torch.__file__).parent)
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
            torch.ops.aten.is_nonzero.default}


class HostSyncs(TorchDispatchMode):
    """Records (file:line, op) for every sync while active; `read_backs` counts `.tolist()`."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.read_backs: list[str] = []
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        counter = self

        def tolist(tensor):
            counter.read_backs.append(_caller())
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if func in SYNC_OPS or bool_index:
            self.syncs.append((_caller(), str(func)))
        return func(*args, **kwargs)

    def from_files(self, prefix: str) -> list[tuple[str, str]]:
        return [(where, op) for where, op in self.syncs if where.startswith(prefix)]


def _caller() -> str:
    """file:line of the innermost frame that is neither torch's nor this module's."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
