"""The run directory: its resolved config, and the files export needs.

    RUN/config.yaml        the fully resolved config (written once; a re-run must agree with it)
    RUN/model/config.json  the HF config of the trained model
    RUN/model/tokenizer/   a copy of the tokenizer's files
    RUN/metrics.jsonl, RUN/checkpoints/, RUN/wandb/

Re-running a command on an existing run directory resumes it. Only settings that do not
change what the run computes may differ from the stored config (how long to train, how
often to log, checkpoint or validate, W&B, how the vanishing-term guard reacts); anything else is
an error naming the key.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from data_prep import atomic
from data_prep.differences import first_difference
from data_prep.errors import UserError
from pipeline.config import RunConfig, dump, flatten, load_config, to_dict

CONFIG = "config.yaml"
MODEL = "model"
CHANGEABLE = {
    "train.max_steps", "train.log_every", "train.max_bad_steps", "train.threads_per_rank", "train.peak_tflops", "train.stop_signals", "train.dist_timeout_s",
    "checkpoint.every_steps", "checkpoint.keep_last", "eval.every_steps", "eval.batches",
    "adversarial.vanish_ratio", "adversarial.vanish_steps", "adversarial.on_vanish",
}


def resolve_run_config(config_path: str | None, overrides: list[str], run_dir: Path) -> RunConfig:
    """The config for this launch: the given one, checked against the run's stored config."""
    stored_path = Path(run_dir) / CONFIG
    if config_path is None and not stored_path.is_file():
        raise UserError(f"--config: needed to start a new run in {run_dir}")
    config = load_config(config_path or stored_path, overrides)
    if stored_path.is_file():
        stored = flatten(yaml.safe_load(stored_path.read_text()))
        fixed = {key: value for key, value in flatten(to_dict(config)).items() if key not in CHANGEABLE and not key.startswith("wandb.")}
        difference = first_difference({key: stored.get(key) for key in fixed}, fixed)
        if difference:
            key, was, now = difference
            raise UserError(f"{stored_path}: this run was started with {key}={was!r}, not {now!r}; use a new --run-dir")
    return config


def write_run_files(run_dir: Path, config: RunConfig, model_config, tokenizer) -> None:
    """config.yaml, and the model config + tokenizer that `alum export` packages."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(run_dir / CONFIG, dump(config).encode())
    model_dir = run_dir / MODEL
    model_dir.mkdir(exist_ok=True)
    atomic.write_bytes(model_dir / "config.json", model_config.to_json_string().encode())
    if not (model_dir / "tokenizer").is_dir():
        with atomic.directory(model_dir / "tokenizer") as tmp:
            for name in tokenizer.files:  # the tokenizer's own files, not a model directory's weights
                shutil.copy2(tokenizer.path / name, tmp / name)
