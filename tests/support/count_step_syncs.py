"""Every host sync of real training steps on a one-rank DeepSpeed engine (CPU), as JSON.

    python tests/support/count_step_syncs.py RUN_DIR OUT.json key=value ...

Runs training as `alum pretrain` does (`pipeline.train.pretrain.train`, config `tiny` plus the
overrides) under `host_syncs.HostSyncs`, every library's syncs included, with a mark each
time a step's batches are built. The record is cut after each `.tolist()` read-back (the
step's own, in `StepStats.gather`): piece N holds what ran after step N - 1's read-back up
to step N's, i.e. counting step N - 1 in, the loop's schedules, step N itself and the
batches built meanwhile. Piece 0 also holds the set-up, and what follows the last
read-back (final logging and checkpoint) is left out.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from host_syncs import HostSyncs


def main() -> None:
    from pipeline.data.batches import Batches
    from pipeline.train.distributed import shutdown_distributed
    from pipeline.train.pretrain import train

    run_dir, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    counter = HostSyncs()
    build = Batches.for_step

    def for_step(batches, step, consumed_samples, rate):
        counter.mark(f"batch {step}")
        return build(batches, step, consumed_samples, rate)

    Batches.for_step = for_step  # observed, not replaced: the loop gets the batches it built
    with counter:
        train("tiny", run_dir, overrides)
    shutdown_distributed()
    out.write_text(json.dumps([_summary(piece) for piece in _pieces(counter.events)]))


def _pieces(events: list[tuple[str, str, str]]) -> list[list[tuple[str, str, str]]]:
    """The events cut after each read-back; the rest after the last one is dropped."""
    pieces, current = [], []
    for event in events:
        current.append(event)
        if event[0] == "read_back":
            pieces.append(current)
            current = []
    return pieces


def _summary(piece: list[tuple[str, str, str]]) -> dict:
    """Syncs counted by library-relative file:line and op; read-backs and marks in order."""
    return {
        "syncs": Counter(f"{_short(where)} {op}" for kind, where, op in piece if kind == "sync"),
        "read_backs": [_short(where) for kind, where, _ in piece if kind == "read_back"],
        "marks": [label for kind, _, label in piece if kind == "mark"],
    }


def _short(where: str) -> str:
    """file:line from its package down:
    .../site-packages/deepspeed/runtime/utils.py:233 -> deepspeed/runtime/utils.py:233."""
    parts = Path(where).parts
    starts = [i for i, part in enumerate(parts) if part in ("pipeline", "deepspeed", "transformers")]
    return str(Path(*parts[starts[0] :])) if starts else where


if __name__ == "__main__":
    main()
