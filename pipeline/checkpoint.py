"""Checkpoints: DeepSpeed's engine state plus what exact resumption needs.

A checkpoint `checkpoints/step00000100/` holds DeepSpeed's files (model, optimizer and LR
scheduler, ZeRO partitions), the client state (consumed samples, counters, W&B run id),
every rank's RNG states (`rng_rank00000.pt`: dropout is the only randomness with state;
masking and sample order are counter-based), and `complete.json`.

DeepSpeed writes `latest` from rank 0 before the other ranks are known to have finished,
and not atomically, so it is not used: every rank fsyncs, all ranks meet at a barrier,
and only then rank 0 writes `complete.json` and moves `checkpoints/latest` (temporary
name + rename). A checkpoint without `complete.json` is never loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import deepspeed.comm as dist
from deepspeed.accelerator import get_accelerator

from data_prep import atomic
from data_prep.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def latest_complete(run_dir: Path) -> tuple[str | None, str | None]:
    """(tag to resume from, a note when `latest` had to be passed over)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if is_complete(root / tag):
            return tag, None
    complete = sorted(p.name for p in root.glob("step*") if is_complete(p))
    if not complete:
        return None, None
    return complete[-1], f"{pointer} does not name a complete checkpoint; resuming from {complete[-1]}"


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int) -> str:
    """Save on every rank; returns the tag once it is complete everywhere."""
    root = Path(run_dir) / CHECKPOINTS
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(_rng_state(), root / tag / f"rng_rank{rank:05d}.pt")
    _fsync_tree(root / tag)
    dist.barrier()
    if rank == 0:
        atomic.write_json(root / tag / COMPLETE, {"step": step, "world_size": dist.get_world_size()})
        atomic.write_bytes(root / LATEST, tag.encode())
        _prune(root, keep_last)
    dist.barrier()
    return tag


def load(engine, run_dir: Path, tag: str, load_optimizer: bool = True) -> dict:
    """Load a complete checkpoint into the engine; returns its client state."""
    root = Path(run_dir) / CHECKPOINTS
    try:
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer,
            load_module_only=not load_optimizer,
        )
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "Missing key" not in str(e):
            raise
        detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing key" in line)
        raise UserError(f"{root / tag}: checkpoint does not fit this model ({detail})") from None
    if path is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    return client_state or {}


def restore_rng(run_dir: Path, tag: str) -> None:
    """This rank's RNG states as they were when the checkpoint was written."""
    path = Path(run_dir) / CHECKPOINTS / tag / f"rng_rank{dist.get_rank():05d}.pt"
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["cpu"])
    if state.get("accelerator") is not None:
        get_accelerator().set_rng_state(state["accelerator"])


def _rng_state() -> dict:
    accelerator = get_accelerator()
    on_device = accelerator.device_name() != "cpu"
    return {"cpu": torch.get_rng_state(), "accelerator": accelerator.get_rng_state() if on_device else None}


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    atomic.fsync_dir(directory)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and stale partial ones."""
    tags = sorted(p for p in root.glob("step*") if p.is_dir())
    complete = [p for p in tags if is_complete(p)]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else None
    for path in tags:
        if path not in keep and (is_complete(path) or (newest and path.name < newest.name)):
            shutil.rmtree(path, ignore_errors=True)
