"""The random state dropout draws from: the CPU generator's, plus the accelerator's when
there is one. The ALUM passes replay it within a step; checkpoints save it per rank."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class RngState:
    cpu: Tensor
    accelerator: Tensor | None

    @classmethod
    def capture(cls) -> RngState:
        accelerator = _accelerator()
        return cls(torch.get_rng_state(), accelerator.get_rng_state() if accelerator else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            _accelerator().set_rng_state(self.accelerator)

    def to_dict(self) -> dict:
        """For torch.save; `RngState(**saved)` reads it back."""
        return asdict(self)


def restore_saved(saved: dict, reseed: int) -> str | None:
    """A checkpoint's RNG state (`RngState.to_dict`) on this machine, which may be of another
    device type than the one that wrote it: what the state has and this machine uses is
    restored; an accelerator generator the state lacks (it was written on CPUs) is seeded
    with `reseed`, so ranks keep distinct dropout streams. None when the state fit the
    machine, else what was done, in words."""
    state = RngState(**saved)
    accelerator = _accelerator()
    if (accelerator is None) == (state.accelerator is None):
        state.restore()
        return None
    torch.set_rng_state(state.cpu)
    if accelerator is None:
        return (
            "its accelerator's RNG states were written on a GPU and are unused here (no accelerator): "
            "the CPU's are restored"
        )
    accelerator.manual_seed(reseed)
    return "it has no accelerator RNG states (written on CPUs): this machine's are seeded from (seed, rank, step)"


def _accelerator():
    """The accelerator whose generator dropout uses, or None on CPU: DeepSpeed's (CUDA, XPU,
    ...) when DeepSpeed is in use, else CUDA's. DeepSpeed is not imported here: it is slow
    to import, and a plain PyTorch or HF Trainer loop using the ALUM loss may not have it."""
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        return None if accelerator.device_name() == "cpu" else accelerator
    return torch.cuda if torch.cuda.is_available() else None
