"""Where a launch starts: fresh, resumed from its own run's latest complete checkpoint, or
initialised from another run's (`checkpoint.init_from`, continual pretraining).

`start_point` decides before the engine exists (so a finished run costs nothing and ZeRO
can be told to load a checkpoint of another world size); `resume` loads it into the engine
and returns the counters the loop goes on from, with each rank's dropout stream set up so
that a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed

from data_prep.errors import UserError
from pipeline.train import checkpoint, weights_only
from pipeline.train.integrity import problems

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.train.config import RunConfig


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0
    adv_skipped: int = 0  # steps whose adversarial term was dropped (non-finite)
    bad_streak: int = 0  # consecutive steps with a non-finite loss
    vanish_streak: int = 0  # consecutive active steps whose adversarial term was numerically zero
    wandb_id: str | None = None

    def client_state(self, world_size: int) -> dict:
        """What a checkpoint keeps of the state besides the engine's own."""
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "adv_skipped": self.adv_skipped,
            "vanish_streak": self.vanish_streak,
            "wandb_id": self.wandb_id,
            "world_size": world_size,
        }


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a launch loads."""

    run_dir: Path
    tag: str
    resume: bool  # its own run's (True) or checkpoint.init_from's (False)
    world_size: int  # of the run that wrote it
    note: str | None = None  # what latest_complete had to say about skipped checkpoints


def start_point(run_dir: Path, init_from: str | None) -> StartPoint | None:
    tag, note = checkpoint.latest_complete(run_dir)
    if tag is not None:
        return StartPoint(run_dir, tag, True, checkpoint.saved_world_size(run_dir, tag), note)
    if init_from is None:
        return None
    source_dir, source_tag = _checkpoint_source(Path(init_from))
    return StartPoint(source_dir, source_tag, False, checkpoint.saved_world_size(source_dir, source_tag))


def _checkpoint_source(path: Path) -> tuple[Path, str]:
    """A run directory (its latest complete checkpoint) or one of its checkpoint tags."""
    if checkpoint.is_complete(path):
        return path.parent.parent, path.name
    tag, _ = checkpoint.latest_complete(path)
    if tag is None:
        raise UserError(f"checkpoint.init_from: {path}: no complete checkpoint in this run directory")
    return path, tag


def verified(start: StartPoint | None, rank: int) -> StartPoint | None:
    """The start point if its files are as they were saved. A damaged checkpoint of the
    run's own is set aside and the previous complete one taken instead; with none left, or
    a damaged checkpoint.init_from, the launch stops. An intact one whose files would run
    code when loaded (`pipeline.train.weights_only`) stops it too. Rank 0 checks, every rank agrees."""
    while start is not None:
        tag_dir = start.run_dir / checkpoint.CHECKPOINTS / start.tag
        found = [_inspect(start) if rank == 0 else None]
        torch.distributed.broadcast_object_list(found, src=0)
        damaged, refused = found[0]
        if refused:
            raise UserError(refused)
        if not damaged:
            return start
        damage = damaged[0] + (f" and {len(damaged) - 1} more" if len(damaged) > 1 else "")
        previous = checkpoint.previous_complete(start.run_dir, start.tag) if start.resume else None
        if previous is None:
            raise UserError(
                f"{tag_dir}: damaged ({damage}) and no earlier complete checkpoint to "
                f"{'resume' if start.resume else 'initialise'} from; restore it, or start another run directory"
            )
        if rank == 0:
            print(f"{tag_dir}: damaged ({damage}); set aside, resuming from {previous}", flush=True)
            checkpoint.set_aside(start.run_dir, start.tag)
        torch.distributed.barrier()
        start = StartPoint(start.run_dir, previous, True, checkpoint.saved_world_size(start.run_dir, previous))
    return None


def _inspect(start: StartPoint) -> tuple[list[str], str | None]:
    """(what differs from the files as saved, why loading them would run code): the second
    only for a checkpoint with nothing of the first."""
    tag_dir = start.run_dir / checkpoint.CHECKPOINTS / start.tag
    damaged = problems(tag_dir, checkpoint.recorded_files(start.run_dir, start.tag))
    return damaged, None if damaged else weights_only.refusal(tag_dir)


def dropout_seed(seed: int, rank: int) -> int:
    """Each rank's dropout stream, from the run's seed."""
    return seed * 1000 + rank + 1


def resume(
    engine: DeepSpeedEngine,
    *,
    run_dir: Path,
    start: StartPoint | None,
    config: RunConfig,
    rank: int,
    world_size: int,
    states: list[checkpoint.CheckpointedState],
) -> TrainState:
    """Load the start point into the engine, and each of `states` from a resumed checkpoint
    (otherwise their start state); the state the loop continues from."""
    state, client = _resume(engine, run_dir=run_dir, start=start, config=config, rank=rank, world_size=world_size)
    for kept in states:
        saved = client.get(kept.CLIENT_KEY) if start and start.resume else None
        if saved is not None:
            kept.load_state_dict(saved)
        else:
            kept.start(engine.module)
    return state


def _resume(
    engine: DeepSpeedEngine, *, run_dir: Path, start: StartPoint | None, config: RunConfig, rank: int, world_size: int
) -> tuple[TrainState, dict]:
    """(the state, the checkpoint's client state or {})."""
    if rank == 0:
        for name in checkpoint.remove_partial(run_dir, start.tag if start and start.resume else None):
            print(
                f"removed partial checkpoint {run_dir / checkpoint.CHECKPOINTS / name} (no {checkpoint.COMPLETE}: "
                "the job stopped while saving it)",
                flush=True,
            )
    seed = dropout_seed(config.train.seed, rank)
    if start is None:
        torch.manual_seed(seed)
        return TrainState(), {}
    source = start.run_dir / checkpoint.CHECKPOINTS / start.tag
    if rank == 0 and start.note:
        print(start.note, flush=True)
    if engine.load_universal_checkpoint() and checkpoint.make_universal(start.run_dir, start.tag) and rank == 0:
        print(
            f"converted {source} (written by {start.world_size} ranks) to a universal checkpoint for {world_size} "
            "ranks",
            flush=True,
        )
    load_optimizer = start.resume or config.checkpoint.init_optimizer
    client = checkpoint.load(engine, start.run_dir, start.tag, load_optimizer=load_optimizer)
    if not start.resume:
        torch.manual_seed(seed)
        if rank == 0:
            print(f"initialised from {source}", flush=True)
        if not load_optimizer:
            return TrainState(), client
        return TrainState(client["step"], client["consumed_samples"], client["adv_skipped"]), client
    # When the ranks hold other samples than before (another world size), their dropout streams
    # cannot go on: new ones from (seed, rank, step) keep this launch deterministic. Likewise for
    # an accelerator generator the checkpoint has no state for (written on another device type).
    reseed = seed * 1_000_003 + client["step"]
    if start.world_size == world_size:
        note = checkpoint.restore_rng(start.run_dir, start.tag, reseed)
        if note and rank == 0:
            print(f"{source}: {note}", flush=True)
    else:
        torch.manual_seed(reseed)
    if rank == 0:
        print(f"resumed from {source} (step {client['step']})", flush=True)
    return TrainState(
        client["step"],
        client["consumed_samples"],
        client["adv_skipped"],
        0,
        client.get("vanish_streak", 0),
        client.get("wandb_id"),
    ), client
