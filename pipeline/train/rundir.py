"""The run directory: what makes a directory one, its resolved config, and the files export needs.

    RUN/.alum-output.json  the marker: written by pipeline.train.pretrain (data_prep.output_dir)
    RUN/.lock              held by the job writing the run (pipeline.train.run_lock)
    RUN/config.yaml        the fully resolved config (written once; a re-run must agree with it)
    RUN/model/config.json  the HF config of the trained model
    RUN/model/tokenizer/   a copy of the tokenizer's files
    RUN/metrics.jsonl, RUN/checkpoints/, RUN/wandb/

A `--run-dir` must be new, empty or a run directory, which is known by its marker, or, for
one written before the marker, by its layout (config.yaml, model/config.json and a
checkpoints/stepNNNNNNNN directory); it gets the marker when it resumes. Any other
directory is refused before anything in it is read, written or deleted.

Re-running a command on an existing run directory resumes it. Only settings that do not
change what the run computes may differ from the stored config (how long to train, how
often to log, checkpoint or validate, W&B, how the vanishing-term guard reacts); anything else is
an error naming the key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from data_prep import atomic, output_dir
from data_prep.differences import first_difference
from data_prep.errors import UserError
from pipeline.model.perturbation import UPDATE_ALIASES
from pipeline.train.checkpoint import CHECKPOINTS, TAG
from pipeline.train.config import RunConfig, dump, flatten, load_config, to_dict
from pipeline.train.run_lock import LOCK

COMMAND = "pipeline.pretrain"  # the marker's written_by: the entry point's name, as run directories have it
CONFIG = "config.yaml"
MODEL = "model"
CHANGEABLE = {
    "train.max_steps",
    "train.log_every",
    "train.max_bad_steps",
    "train.threads_per_rank",
    "train.peak_tflops",
    "train.stop_signals",
    "train.dist_timeout_s",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "eval.every_steps",
    "eval.batches",
    "eval.sets",  # what else is validated on: the training computes the same
    "adversarial.vanish_ratio",
    "adversarial.vanish_steps",
    "adversarial.on_vanish",
}

# Values stored under an older name mean what the new name does: a run started with them resumes.
RENAMED = {"adversarial.update": UPDATE_ALIASES}


def resolve_run_config(config_path: str | None, overrides: list[str], run_dir: Path) -> RunConfig:
    """The config for this launch: the given one, checked against the run's stored config."""
    check_run_dir(Path(run_dir))
    stored_path = Path(run_dir) / CONFIG
    if config_path is None and not stored_path.is_file():
        raise UserError(f"--config: needed to start a new run in {run_dir}")
    config = load_config(config_path or stored_path, overrides)
    if stored_path.is_file():
        # A key the stored config lacks is newer than the run, which ran with its default.
        stored = flatten(to_dict(RunConfig())) | flatten(yaml.safe_load(stored_path.read_text()))
        stored |= {key: names.get(stored[key], stored[key]) for key, names in RENAMED.items() if key in stored}
        fixed = {
            key: _by_name(value)
            for key, value in flatten(to_dict(config)).items()
            if key not in CHANGEABLE and not key.startswith("wandb.")
        }
        difference = first_difference({key: _by_name(stored.get(key)) for key in fixed}, fixed)
        if difference:
            key, was, now = difference
            raise UserError(f"{stored_path}: this run was started with {key}={was!r}, not {now!r}; use a new --run-dir")
    return config


def _by_name(value):
    """A list of named entries (data.sources) as a mapping by name, so that a changed entry is
    named by its key (data.sources.wiki.weight); other values as they are."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return {entry["name"]: entry for entry in value}
    return value


def check_run_dir(run_dir: Path) -> None:
    """Refuse a --run-dir that is neither new, nor empty, nor a run directory."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: --run-dir exists and is not a directory")
    if is_run_dir(run_dir) or not set(os.listdir(run_dir)) - {LOCK}:  # the lock alone: a run killed as it began
        return
    owner = output_dir.written_by(run_dir)
    why = (
        f"{owner} wrote it"
        if owner
        else f"no {output_dir.MARKER}, and not laid out as a run from before the marker: {CONFIG}, "
        f"{MODEL}/config.json, {CHECKPOINTS}/stepNNNNNNNN"
    )
    raise UserError(f"{run_dir}: not a run directory ({why}); nothing in it was changed: use a new or empty --run-dir")


def is_run_dir(path: Path) -> bool:
    """Marked as one, or laid out as one from before the marker (a stepNNNNNNNN checkpoint
    directory, not just any checkpoints/, is what a user's own directory would not have)."""
    if output_dir.written_by(path) == COMMAND:
        return True
    checkpoints = path / CHECKPOINTS
    return (
        (path / CONFIG).is_file()
        and (path / MODEL / "config.json").is_file()
        and checkpoints.is_dir()
        and any(TAG.fullmatch(p.name) and p.is_dir() for p in checkpoints.iterdir())
    )


def write_run_files(run_dir: Path, config: RunConfig, model_config, tokenizer) -> None:
    """The marker (first: a new run, or one from before the marker), config.yaml, and the
    model config + tokenizer that `alum export` packages."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if output_dir.written_by(run_dir) != COMMAND:
        output_dir.mark(run_dir, COMMAND)
    atomic.write_bytes(run_dir / CONFIG, dump(config).encode())
    model_dir = run_dir / MODEL
    model_dir.mkdir(exist_ok=True)
    atomic.write_bytes(model_dir / "config.json", model_config.to_json_string().encode())
    if not (model_dir / "tokenizer").is_dir():
        with atomic.directory(model_dir / "tokenizer") as tmp:
            for name in tokenizer.files:  # the tokenizer's own files, not a model directory's weights
                shutil.copy2(tokenizer.path / name, tmp / name)
