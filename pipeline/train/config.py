"""Run configuration: typed dataclasses, YAML files, dotted command-line overrides.

A run is described by one YAML file (see configs/) plus `key=value` overrides such as
`train.max_steps=100 adversarial.method=alum`. Values are parsed as YAML scalars, every
key is checked against the dataclasses below, and an unknown key, a wrong type or a value
out of range is a `UserError` naming the key in full. Ranges and choices are each
dataclass's own (`__post_init__`, with pipeline.core.checks), so code that builds one directly
gets the same checks; the loader, which knows where a section sits, puts the key path in
front. The fully resolved config is written to the run directory and logged to W&B, so a
run can always be reproduced from its own directory.

Paths (PATH_KEYS) work from any folder: relative ones in a YAML file are relative to that
file, on the command line to the current folder, and the defaults point into the shipped
configs/; the resolved config holds them absolute. `--config tiny` names a shipped config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_prep.errors import UserError
from pipeline.core import checks
from pipeline.core.yaml_mapping import read_yaml_mapping
from pipeline.data.curriculum import MaskSchedule
from pipeline.methods.adversarial import AdversarialConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PLACEHOLDER = "/path/to/"  # how a shipped config marks a path its user must give
PATH_KEYS = ("data.shards", "data.tokenizer", "model.config", "model.init_from", "checkpoint.init_from", "deepspeed")


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # a directory written by `alum shard`
    tokenizer: str = (
        ""  # the tokenizer directory the shards were made with (checked by fingerprint); default: model.init_from
    )
    train_split: str = "train"
    val_split: str = "val"


@dataclass(frozen=True)
class ModelConfig:
    config: str = str(CONFIGS / "models" / "tiny.yaml")  # a model-size YAML, or an HF config/model directory
    # an HF model directory (as published, or `alum export`): continual pretraining from its weights, config, tokenizer
    init_from: str | None = None
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100
    global_batch_size: int = 32
    micro_batch_size: int = 8
    lr: float = 5e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # linear decay to lr * min_lr_ratio at decay_steps
    decay_steps: int = 0  # where the decay ends (0: train.max_steps, which then moves if max_steps is raised on resume)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 where supported, else fp32) | fp32 | bf16 | fp16
    log_every: int = 10
    seed: int = 0
    max_bad_steps: int = 5  # consecutive non-finite losses before the run aborts
    threads_per_rank: int = (
        0  # torch threads per process; 0 = the job's cores (CPU affinity, as SLURM binds) / local ranks
    )
    peak_tflops: float = (
        0.0  # per accelerator, for perf/mfu; 0: known GPUs by name (pipeline/train/flops.py), else no perf/mfu
    )
    # any of these to any rank: checkpoint at the next step, exit 0 (pipeline/train/stop.py)
    stop_signals: str = "SIGTERM,SIGUSR1,SIGINT"
    dist_timeout_s: float = (
        600.0  # how long a rank waits for the others (start-up rendezvous, any collective) before failing
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every"):
            checks.integer(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "seed", "max_bad_steps", "threads_per_rank"):
            checks.integer(name, getattr(self, name), minimum=0)
        for name in ("adam_eps", "dist_timeout_s"):
            checks.number(name, getattr(self, name), positive=True)
        for name in ("lr", "weight_decay", "grad_clip"):  # lr 0: a run that updates nothing (a check of its start)
            checks.number(name, getattr(self, name))
        checks.unit_interval("min_lr_ratio", self.min_lr_ratio, one=True)
        for name in ("adam_beta1", "adam_beta2"):
            checks.unit_interval(name, getattr(self, name), one=False)
        checks.number("peak_tflops", self.peak_tflops, note=" (0: known GPUs by name)")
        checks.integer("decay_steps", self.decay_steps, minimum=0, note=" (0: max_steps)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size: must be a multiple of micro_batch_size ({self.micro_batch_size}), "
                f"got {self.global_batch_size}"
            )
        checks.choice("precision", self.precision, PRECISIONS)
        for name in self.signal_names():
            if not name.startswith("SIG") or not hasattr(signal, name):
                raise ValueError(f"stop_signals: {name!r} is not a signal name (e.g. SIGTERM,SIGUSR1)")

    def signal_names(self) -> list[str]:
        """`stop_signals` as a list of names."""
        return [name for name in (n.strip() for n in self.stop_signals.split(",")) if name]


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0  # 0: no validation pass during training
    batches: int = 8  # a validation pass reads batches x train.micro_batch_size rows in all, split over the ranks
    mask_rate: float = 0.15

    def __post_init__(self) -> None:
        checks.fraction("mask_rate", self.mask_rate, one=False)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 2
    init_from: str | None = None  # another run's directory (or one of its tags): continue from its weights
    init_optimizer: bool = False  # with init_from: also take its optimizer state and step

    def __post_init__(self) -> None:
        checks.integer("every_steps", self.every_steps, minimum=1)
        checks.integer("keep_last", self.keep_last, minimum=1)


@dataclass(frozen=True)
class MaskingConfig:
    schedule: MaskSchedule = field(default_factory=MaskSchedule)


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "alum"
    name: str | None = None
    entity: str | None = None
    init_timeout_s: float = 90.0  # how long an online run waits for the W&B server at start (W&B's default)
    fallback: str = (
        "offline"  # online and no server within init_timeout_s: offline (log locally, `wandb sync` later) | error
    )

    def __post_init__(self) -> None:
        checks.choice("mode", self.mode, ("online", "offline", "disabled"))
        checks.choice("fallback", self.fallback, ("offline", "error"))
        checks.number("init_timeout_s", self.init_timeout_s, positive=True)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    deepspeed: str | dict = str(CONFIGS / "deepspeed" / "zero2.json")  # a DeepSpeed JSON file or an inline mapping
    wandb: WandbConfig = field(default_factory=WandbConfig)


def find_config(name: str | Path) -> Path:
    """A config file's path; a bare name (`tiny`) that is not a file names a shipped config."""
    path = Path(name)
    shipped = CONFIGS / f"{name}.yaml"
    if not path.exists() and path.name == str(name) and not path.suffix and shipped.is_file():
        return shipped
    return path


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply `key=value` overrides, and check every key and type."""
    data = {}
    if path is not None:
        path = find_config(path)
        if not path.exists():
            shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
            raise UserError(f"{path}: file not found (shipped configs, by name: {shipped})")
        data = read_yaml_mapping(path, "config sections")
        _absolute_paths(data, path.resolve().parent)
    for item in overrides:
        _apply_override(data, item)
    config = _build(RunConfig, data, "")
    if (not config.data.tokenizer or config.data.tokenizer.startswith(PLACEHOLDER)) and config.model.init_from:
        # A published model directory holds its tokenizer: the shards must be made with it. A
        # shipped config's placeholder (/path/to/tokenizer) is no setting: it does not win over that.
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=config.model.init_from))
    _require_data(config)
    return config


def _absolute_paths(data: dict, base: Path) -> None:
    """Relative paths of PATH_KEYS made absolute against `base`, in place."""
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        target = data
        for section in sections:
            target = target.get(section) if isinstance(target, dict) else None
        if isinstance(target, dict) and isinstance(target.get(name), str) and target[name]:
            target[name] = os.path.abspath(os.path.join(base, os.path.expanduser(target[name])))


def missing_paths(config: "RunConfig") -> None:
    """Every path of the config that does not exist, in one error (before any set-up)."""
    paths = {
        "data.shards": config.data.shards,
        "data.tokenizer": config.data.tokenizer,
        "model.config": None if config.model.init_from else config.model.config,
        "model.init_from": config.model.init_from,
        "checkpoint.init_from": config.checkpoint.init_from,
        "deepspeed": config.deepspeed if isinstance(config.deepspeed, str) else None,
    }
    placeholders = [key for key, value in paths.items() if value and value.startswith(PLACEHOLDER)]
    if placeholders:
        raise UserError(
            f"{', '.join(placeholders)}: still the config's placeholder ({paths[placeholders[0]]}); "
            f"set {placeholders[0]}=... on the command line or in the config"
        )
    missing = [f"{key}: {value}" for key, value in paths.items() if value and not Path(value).exists()]
    if missing:
        raise UserError(
            f"no such file or directory: {'; '.join(missing)} (paths in a config file are relative to it, "
            "on the command line to the current folder)"
        )


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"{item}: overrides are key=value, e.g. train.max_steps=100")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    target = data
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise UserError(f"{key}: {part} is not a section")
    target[parts[-1]] = value
    if key in PATH_KEYS and isinstance(value, str) and value:
        target[parts[-1]] = os.path.abspath(os.path.expanduser(value))


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
        guess = f"did you mean {prefix}{close[0]}? " if close else ""
        raise UserError(f"{prefix}{unknown[0]}: unknown config key ({guess}known: {', '.join(sorted(names))})")
    values = {name: _convert(hints[name], data[name], f"{prefix}{name}") for name in data}
    try:
        return cls(**values)
    except ValueError as e:  # a dataclass names its own field; only here is the path to it known
        raise UserError(f"{prefix}{e}") from None


def _convert(kind, value: Any, key: str):
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, f"{key}.")
    options = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        else (kind,)
    )
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{key}: must be set (got null)")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _is_float(value):
            return float(value)  # YAML 1.1 reads "1e-12" (no dot) as a string
        if option is str and isinstance(value, str):
            return value
        if option is dict and isinstance(value, dict):
            return value
    expected = " or ".join(o.__name__ for o in options if o is not type(None))
    raise UserError(f"{key}: expected {expected}, got {value!r}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _require_data(config: RunConfig) -> None:
    """The keys with no usable default; data.tokenizer may come from model.init_from, so after that."""
    if not config.data.shards:
        raise UserError("data.shards: must be set to a directory written by `alum shard`")
    if not config.data.tokenizer:
        raise UserError(
            "data.tokenizer: must be set to the tokenizer directory the shards were made with (or set model.init_from)"
        )


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def flatten(data: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.0005}} -> {"train.lr": 0.0005}: the dotted keys users write in overrides."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "deepspeed":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
