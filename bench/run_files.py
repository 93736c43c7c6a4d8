"""What a run directory holds, read from outside while its job may be killed mid-write:
metrics.jsonl, the checkpoints (complete or partial) and the resolved config."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, without a trailing line a kill cut short."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step*") if p.is_dir()) if root.is_dir() else []


def tag_step(tag: str) -> int:
    return int(tag[len("step") :])


def newest_complete(run_dir: Path) -> str | None:
    complete = [p.name for p in checkpoint_dirs(run_dir) if (p / "complete.json").is_file()]
    return complete[-1] if complete else None


def partial_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint directories newer than the newest complete one, without complete.json."""
    newest = newest_complete(run_dir)
    return [
        p.name
        for p in checkpoint_dirs(run_dir)
        if not (p / "complete.json").is_file() and (newest is None or p.name > newest)
    ]


def run_settings(run_dir: Path) -> dict:
    """max_steps, checkpoint every, global batch: from the run's resolved config.yaml."""
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return {
        "max_steps": config["train"]["max_steps"],
        "every": config["checkpoint"]["every_steps"],
        "global_batch_size": config["train"]["global_batch_size"],
    }


def save_seconds(run_dir: Path) -> float | None:
    """How long the complete checkpoints took to write (first file to complete.json), the median."""
    times = []
    for tag in checkpoint_dirs(run_dir):
        done = tag / "complete.json"
        try:  # rank 0 may be pruning it right now
            files = [p for p in tag.iterdir() if p.is_file() and p.name != "complete.json"] if done.is_file() else []
            if files:
                times.append(done.stat().st_mtime - min(p.stat().st_mtime for p in files))
        except FileNotFoundError:
            pass
    return statistics.median(times) if times else None


def checkpoint_steps(settings: dict) -> list[int]:
    """The steps a run with these run_settings saves at: every `every` steps, and the last."""
    return sorted(set(range(settings["every"], settings["max_steps"] + 1, settings["every"])) | {settings["max_steps"]})
