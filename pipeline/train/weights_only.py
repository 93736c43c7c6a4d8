"""Checkpoint files load as data, never as code.

A `.pt` file is a pickle, and unpickling calls whatever functions the pickle names: a
checkpoint from someone else, or one edited on a shared disk with its complete.json digests
rewritten to match, would run its payload on resume, on `alum export` and on
`checkpoint.init_from`. Two layers keep that from happening:

- `enforce`: every torch.load in the process is weights-only (tensors, numbers, strings,
  containers and the types allowed by name), DeepSpeed's own included: torch's
  TORCH_FORCE_WEIGHTS_ONLY_LOAD switch overrides the `weights_only=False` that DeepSpeed
  0.19.8 passes (engine loading, ds_to_universal, zero_to_fp32). The guarantee.
- `refusal`: before anything is loaded, each file's pickle is read without running it
  (torch's disassembler), so that a file naming anything else is refused in one line that
  names it, instead of an unpickling traceback from inside DeepSpeed. The message.

DEEPSPEED_TYPES are the non-tensor objects DeepSpeed 0.19.8 pickles into its model-states,
optimizer-states and universal files: plain records of numbers, whose loading runs no code
of the file's choosing. ZeroStageEnum, LossScaler and fragment_address are all that the
test suite's checkpoints hold (ZeRO 0-3, fp32 and bf16, universal copies); DynamicLossScaler
takes LossScaler's place under fp16 (DeepSpeed's source: fp16 does not run on a CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
DEEPSPEED_TYPES = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
_ALLOWED_NAMES = {f"{t.__module__}.{t.__qualname__}" for t in DEEPSPEED_TYPES}


def enforce() -> None:
    """Make every later torch.load in this process weights-only, DEEPSPEED_TYPES allowed."""
    os.environ[FORCE] = "1"
    torch.serialization.add_safe_globals(DEEPSPEED_TYPES)


def refusal(directory: Path) -> str | None:
    """Why the checkpoint in `directory` must not be loaded, in one line naming the file:
    its first `.pt` file whose pickle calls anything but what weights-only loading allows
    and DEEPSPEED_TYPES, or that is not a torch.save archive. None when every file is data."""
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _ALLOWED_NAMES
        except (ValueError, RuntimeError) as e:  # not a zip archive / a damaged one
            return f"{path}: not a checkpoint file torch can read ({str(e).splitlines()[0]}); refused"
        if unsafe:
            return (
                f"{path}: refused: loading it would call {', '.join(sorted(unsafe))}, which no checkpoint "
                "holds (a file from elsewhere or edited); it was not loaded"
            )
    return None
