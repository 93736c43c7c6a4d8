"""Checkpoints: DeepSpeed's engine state plus what exact resumption needs.

A checkpoint `checkpoints/step00000100/` holds DeepSpeed's files (model, optimizer and LR
scheduler, ZeRO partitions), the client state (consumed samples, counters, W&B run id),
every rank's RNG states (`rng_rank00000.pt`: dropout is the only randomness with state;
masking and sample order are counter-based), and `complete.json`.

ZeRO partitions the optimizer state by rank, and DeepSpeed refuses to load a partitioned
checkpoint on another number of ranks. A resume on another world size first converts the
checkpoint into DeepSpeed's universal format (one file per parameter and optimizer state,
`<tag>/universal/`, made once by rank 0 and kept) and loads that instead.

DeepSpeed writes `latest` from rank 0 before the other ranks are known to have finished,
and not atomically, so it is not used: every rank fsyncs, all ranks meet at a barrier,
and only then rank 0 writes `complete.json` (with every file's size and sha256, see
`pipeline.train.integrity`) and moves `checkpoints/latest` (temporary name + rename). A
checkpoint without `complete.json` is never loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import deepspeed.comm as dist
import torch
from deepspeed import DeepSpeedEngine

from data_prep import atomic
from data_prep.errors import UserError
from pipeline.core.rng import RngState, restore_saved
from pipeline.methods.registry import method_of
from pipeline.train import weights_only
from pipeline.train.integrity import file_digests

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.train.config import RunConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete.json"
UNIVERSAL = "universal"
# torch.save's messages for a write that failed (see `_failed_write`).
TORCH_WRITE_FAILED = re.compile(
    r"inline_container\.cc.*unexpected pos|PytorchStreamWriter failed writing|basic_ios::clear: iostream error"
)
TAG = re.compile(r"step\d{8,}")  # the names tag_for gives: nothing else in checkpoints/ is ever removed
# What DeepSpeed's universal conversion needs to find in a checkpoint's client state.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


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
    complete = complete_tags(run_dir)
    if not complete:
        return None, None
    return complete[-1], f"{pointer} does not name a complete checkpoint; resuming from {complete[-1]}"


def recorded_files(run_dir: Path, tag: str) -> dict[str, dict]:
    """The files `complete.json` lists with their size and sha256 (none for a checkpoint
    saved before the list existed: it cannot be checked)."""
    return json.loads((Path(run_dir) / CHECKPOINTS / tag / COMPLETE).read_text()).get("files", {})


def complete_tags(run_dir: Path) -> list[str]:
    """The run's complete checkpoints, oldest first."""
    return sorted(p.name for p in (Path(run_dir) / CHECKPOINTS).glob("step*") if is_complete(p))


def previous_complete(run_dir: Path, tag: str) -> str | None:
    earlier = [t for t in complete_tags(run_dir) if t < tag]
    return earlier[-1] if earlier else None


def set_aside(run_dir: Path, tag: str) -> None:
    """Make a damaged checkpoint partial (no complete.json), so it is never loaded and the
    run removes it when it gets past that step again."""
    (Path(run_dir) / CHECKPOINTS / tag / COMPLETE).unlink()


def remove_partial(run_dir: Path, after: str | None) -> list[str]:
    """Delete checkpoint directories newer than `after` that never became complete.

    They are what a crash during a save leaves behind; the run goes on from `after` and
    will write those steps again, so nothing in them is ever read.
    """
    root = Path(run_dir) / CHECKPOINTS
    partial = sorted(
        p
        for p in root.glob("step*")
        if TAG.fullmatch(p.name) and p.is_dir() and not is_complete(p) and (after is None or p.name > after)
    )
    for path in partial:
        shutil.rmtree(path)
    return [p.name for p in partial]


class SaveFailed(Exception):
    """A checkpoint could not be written (a full disk, a lost mount); it was removed and the
    previous complete checkpoint stays `latest`."""


def save(engine: DeepSpeedEngine, run_dir: Path, step: int, client_state: dict, keep_last: int) -> str:
    """Save on every rank; returns the tag once it is complete everywhere.

    A write that fails on any rank (`_failed_write`: a full disk, a lost mount) fails the
    save on every rank: the ranks agree on it, rank 0 removes the partial checkpoint, and
    each raises SaveFailed with the first failure's message, so the job stops with one line
    instead of a hang in a collective."""
    root = Path(run_dir) / CHECKPOINTS
    tag = tag_for(step)
    rank = dist.get_rank()

    def write_files():
        try:
            engine.save_checkpoint(
                str(root), tag=tag, client_state={**client_state, **UNIVERSAL_INFO}, save_latest=False
            )
        except Exception as e:
            if _failed_write(e):
                dist.barrier()  # the one DeepSpeed's save ends with: the other ranks are waiting in it
            raise
        torch.save(RngState.capture().to_dict(), root / tag / f"rng_rank{rank:05d}.pt")
        _fsync_tree(root / tag)

    def commit():
        names = sorted(
            str(p.relative_to(root / tag))
            for p in (root / tag).rglob("*")
            if p.is_file() and p != root / tag / COMPLETE
        )
        record = {"step": step, "world_size": dist.get_world_size(), "files": file_digests(root / tag, names)}
        atomic.write_json(root / tag / COMPLETE, record)
        atomic.write_bytes(root / LATEST, tag.encode())

    _agreed(lambda: _clear(root / tag) if rank == 0 else None, root / tag)
    _agreed(write_files, root / tag)
    _agreed(commit if rank == 0 else lambda: None, root / tag)
    if rank == 0:
        _prune(root, keep_last)
    dist.barrier()
    return tag


def _clear(tag_dir: Path) -> None:
    """Remove what an earlier save of this step left: a save starts from an empty directory.

    A job killed after a checkpoint's complete.json was written but before `latest` moved
    resumes from the checkpoint before it and saves this step again; its files must not
    mix with the old ones (another world size's ZeRO partitions, the old complete.json),
    which the new complete.json would otherwise record as its own."""
    if tag_dir.exists():
        shutil.rmtree(tag_dir)


def _failed_write(e: Exception) -> bool:
    """An OSError, or torch.save's own report of a write that failed. Its zip writer reports a
    short write (a full disk, a quota) as a RuntimeError with neither errno nor file name:
    `[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 598` (seen here, alone or
    after `basic_ios::clear: iostream error` from the record being written), or
    `PytorchStreamWriter failed writing file data/0: file write failed`."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and TORCH_WRITE_FAILED.search(str(e)) is not None)


def _write_failure(e: Exception, tag_dir: Path) -> str:
    """`_failed_write` in words, naming the file where known, else the checkpoint directory
    and the space left on its filesystem (what a short write is most likely to be about)."""
    if isinstance(e, OSError):
        return f"{e.filename or tag_dir}: {e.strerror or e}"
    free = shutil.disk_usage(tag_dir if tag_dir.exists() else tag_dir.parent).free
    return (
        f"{tag_dir}: a write failed with {free:,} bytes free on its filesystem "
        f"(torch.save: {str(e).splitlines()[0].strip()})"
    )


def _agreed(action, tag_dir: Path) -> None:
    """Run `action` on every rank; if a write failed anywhere (`_failed_write`), fail everywhere."""
    try:
        action()
        failure = None
    except Exception as e:
        if not _failed_write(e):
            raise
        failure = _write_failure(e, tag_dir)
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    first = next((f for f in failures if f), None)
    if first is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    previous, _ = latest_complete(tag_dir.parent.parent)
    raise SaveFailed(
        f"checkpoint {tag_dir.name} not saved ({first}); it was removed, and "
        f"{previous or 'no checkpoint'} stays the latest complete one"
    )


def _repair_zero3_universal_load(optimizer, weight_decay: list[float]) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal loader (harmless for stages 1-2).

    It gives every parameter group the first group's hyperparameters (weight decay on
    biases and norms), and it hands one shared `step` tensor to every group's Adam state,
    which Adam then increments once per group per step (wrong bias correction from the
    second group on). Without this a resume on another world size drifts from the
    uninterrupted run."""
    for group, decay in zip(optimizer.param_groups, weight_decay):
        group["weight_decay"] = decay
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def saved_world_size(run_dir: Path, tag: str) -> int:
    return json.loads((Path(run_dir) / CHECKPOINTS / tag / COMPLETE).read_text())["world_size"]


def load(engine: DeepSpeedEngine, run_dir: Path, tag: str, load_optimizer: bool = True) -> dict:
    """Load a complete checkpoint into the engine; returns its client state.

    An engine configured with `checkpoint.load_universal` reads the universal copy of the
    checkpoint (see `make_universal`). DeepSpeed reads the files weights-only (`pipeline.train.weights_only`).
    """
    weights_only.enforce()
    root = Path(run_dir) / CHECKPOINTS
    universal = engine.load_universal_checkpoint()
    load_dir, load_tag = (root / tag, UNIVERSAL) if universal else (root, tag)
    weight_decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
    try:
        path, client_state = engine.load_checkpoint(
            str(load_dir),
            tag=load_tag,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
            load_module_only=not load_optimizer,
        )
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "Missing key" not in str(e):
            raise
        detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing key" in line)
        raise UserError(f"{root / tag}: checkpoint does not fit this model ({detail})") from None
    if path is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    if universal:
        _repair_zero3_universal_load(engine.optimizer, weight_decay)
    return client_state or {}


def make_universal(run_dir: Path, tag: str) -> bool:
    """Give a checkpoint its universal copy (rank 0 converts, every rank waits); True if made now."""
    tag_dir = Path(run_dir) / CHECKPOINTS / tag
    target = tag_dir / UNIVERSAL
    made = False
    if dist.get_rank() == 0 and not is_complete(target):
        _convert_to_universal(tag_dir, target)
        made = True
    dist.barrier()
    return made


def _convert_to_universal(tag_dir: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal (reading weights-only) into a temporary directory, renamed once complete."""
    from deepspeed.checkpoint import ds_to_universal

    weights_only.enforce()
    with atomic.directory(target, replace=True) as partial:
        args = argparse.Namespace(
            input_folder=str(tag_dir),
            output_folder=str(partial),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as e:
            raise RuntimeError(
                f"{tag_dir}: conversion to a universal checkpoint failed: {e}\n{log.getvalue()[-2000:]}"
            ) from e
        (tag_dir / "latest_universal").unlink(
            missing_ok=True
        )  # written by ds_to_universal; we name the directory ourselves
        atomic.write_json(partial / COMPLETE, {"source": tag_dir.name})
        _fsync_tree(partial)


class CheckpointedState(Protocol):
    """State a run keeps beside the engine, saved in each checkpoint's client state under
    ``CLIENT_KEY`` and restored on resume (`pipeline.train.resume`); a run that does not resume
    gets ``start(student)`` instead."""

    CLIENT_KEY: str

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def start(self, student: torch.nn.Module) -> None: ...


class Checkpointer:
    """Saves on its schedule: every checkpoint.every_steps, at train.max_steps and when a
    stop was requested, but never right after a non-finite step, so that the last good
    checkpoint stays the latest. Every `CheckpointedState` of the run (a method's companion:
    SMART's teacher, ASA's adversaries) goes into the client state under its key."""

    def __init__(
        self,
        engine: DeepSpeedEngine,
        run_dir: Path,
        config: RunConfig,
        world_size: int,
        states: list[CheckpointedState],
    ):
        """`config`: the RunConfig."""
        self.engine, self.run_dir, self.world_size, self.states = engine, run_dir, world_size, states
        self.every, self.keep_last, self.max_steps = (
            config.checkpoint.every_steps,
            config.checkpoint.keep_last,
            config.train.max_steps,
        )
        self.method = method_of(config.adversarial)

    def due(self, state, stop: bool) -> bool:
        """Also never inside a batch's FreeAT replays (their perturbation is not saved), except at train.max_steps."""
        if state.step == self.max_steps:
            return state.bad_streak == 0
        return state.bad_streak == 0 and (stop or state.step % self.every == 0) and self.method.at_boundary(state.step)

    def save(self, state) -> str:
        client = state.client_state(self.world_size) | {s.CLIENT_KEY: s.state_dict() for s in self.states}
        return save(self.engine, self.run_dir, state.step, client, self.keep_last)


def restore_rng(run_dir: Path, tag: str, reseed: int) -> str | None:
    """This rank's RNG states as they were when the checkpoint was written, as far as this
    machine has their generators (`pipeline.core.rng.restore_saved`: None, or what differs)."""
    path = Path(run_dir) / CHECKPOINTS / tag / f"rng_rank{dist.get_rank():05d}.pt"
    return restore_saved(torch.load(path, weights_only=True), reseed)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    atomic.fsync_dir(directory)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and stale partial ones."""
    tags = sorted(p for p in root.glob("step*") if TAG.fullmatch(p.name) and p.is_dir())
    complete = [p for p in tags if is_complete(p)]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else None
    for path in tags:
        if path not in keep and (is_complete(path) or (newest and path.name < newest.name)):
            shutil.rmtree(path, ignore_errors=True)
