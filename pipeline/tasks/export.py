"""`alum export`: a checkpoint (any ZeRO stage) as a Hugging Face model directory.

The fp32 weights are gathered from the checkpoint files alone (no process group, any
number of ranks having written them): `zero_to_fp32` for ZeRO 1-3, the module state for
stage 0. The result loads with `AutoModelForMaskedLM` and `AutoTokenizer`; the tokenizer
copied into it is the run's own, with its fingerprint, so the export can seed a continual
pretraining run (`model.init_from`) on shards made with the same tokenizer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from data_prep import atomic, output_dir
from data_prep.errors import UserError
from pipeline.train import checkpoint, weights_only
from pipeline.train.rundir import MODEL

COMMAND = "alum export"
PREFIX = "hf."


def export(run_dir: str | Path, out: str | Path, tag: str | None = None, overwrite: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / MODEL / "config.json").is_file():
        raise UserError(f"{run_dir}: not a run directory (no {MODEL}/config.json)")
    if tag is None:
        tag, _ = checkpoint.latest_complete(run_dir)
        if tag is None:
            raise UserError(f"{run_dir}: no complete checkpoint to export")
    tag_dir = run_dir / checkpoint.CHECKPOINTS / tag
    if not checkpoint.is_complete(tag_dir):
        root = run_dir / checkpoint.CHECKPOINTS
        complete = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and checkpoint.is_complete(p)) if root.is_dir() else []
        )
        raise UserError(f"{tag_dir}: not a complete checkpoint (complete: {', '.join(complete) or 'none'})")
    output_dir.check_out(out, COMMAND, [("--run-dir", run_dir)], overwrite)
    refused = weights_only.refusal(tag_dir)
    if refused:
        raise UserError(refused)
    model = load_exported_weights(run_dir, tag)
    _write(model, run_dir / MODEL / "tokenizer", out, overwrite)
    return out


def load_exported_weights(run_dir: Path, tag: str):
    """The HF masked LM of `run_dir` with the fp32 weights of checkpoint `tag`."""
    from transformers import AutoConfig

    from pipeline.model.masked_lm import model_classes

    config = AutoConfig.from_pretrained(str(run_dir / MODEL))
    _, model_class = model_classes(config.model_type)
    model = model_class(config)
    state = {
        k[len(PREFIX) :]: v
        for k, v in _fp32_state_dict(run_dir / checkpoint.CHECKPOINTS, tag).items()
        if k.startswith(PREFIX)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "decoder" in k}  # the output embedding shares the input embedding
    if set(missing) - tied or unexpected:
        raise UserError(
            f"{run_dir}: checkpoint {tag} does not fit the model config (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model


def _fp32_state_dict(root: Path, tag: str) -> dict:
    """Read weights-only (`pipeline.train.weights_only`), zero_to_fp32's loads included."""
    weights_only.enforce()
    tag_dir = root / tag
    if any(tag_dir.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state["module"].items()}


def _write(model, tokenizer_dir: Path, out: Path, overwrite: bool) -> None:
    with atomic.directory(out, replace=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        for path in tokenizer_dir.iterdir():
            shutil.copy2(path, tmp / path.name)
        output_dir.mark(tmp, COMMAND, os.listdir(tmp))
