"""Metrics: `metrics.jsonl` in the run directory and the same keys in W&B, from rank 0.

On resume the log is cut back to the checkpoint's step before anything new is written, so
a resumed run's `metrics.jsonl` reads exactly like an uninterrupted run's. The W&B run id
is kept in the checkpoint, so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from data_prep import atomic

METRICS = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int, wandb_settings, wandb_id: str | None, config: dict):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self._truncate(resume_step)
        if wandb_settings.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=wandb_settings.project,
                entity=wandb_settings.entity,
                name=wandb_settings.name,
                mode=wandb_settings.mode,
                dir=str(run_dir),
                id=wandb_id,
                resume="allow",
                config=config,
            )
            self.wandb_id = self.run.id

    def _truncate(self, resume_step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if (record := _parse(line)) and record["step"] <= resume_step]
        atomic.write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _plain(value):
    """JSON has no NaN/inf: write them as strings so a diverging run still logs."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _parse(line: str) -> dict | None:
    """A logged record; None for an empty line or one cut short by a kill during the write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
