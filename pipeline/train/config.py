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
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_prep.errors import UserError
from pipeline.core import checks
from pipeline.core.typed_mapping import build_dataclass
from pipeline.core.yaml_mapping import read_yaml_mapping
from pipeline.data.curriculum import MaskSchedule
from pipeline.methods.adversarial import AdversarialConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PLACEHOLDER = "/path/to/"  # how a shipped config marks a path its user must give
PATH_KEYS = ("data.shards", "data.tokenizer", "model.config", "model.init_from", "checkpoint.init_from", "deepspeed")
LIST_PATH_KEYS = ("data.sources", "eval.sets")  # lists of entries whose `shards` is a path
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a source's or eval set's name: a metric key's part


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"name: letters, digits, '_', '-', '.' (a letter or digit first), got {name!r}")


@dataclass(frozen=True)
class SourceConfig:
    """One corpus of a mixture: its shard directory and its share of the training samples."""

    name: str = ""  # in the metric keys: data/<name>/..., eval/<name>/...
    shards: str = ""  # a directory written by `alum shard`
    weight: float = 1.0  # relative share of the samples (weights are normalised over the sources)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not self.shards:
            raise ValueError("shards: must be set to a directory written by `alum shard`")
        checks.number("weight", self.weight, positive=True)


@dataclass(frozen=True)
class EvalSetConfig:
    """A shard directory validated on (eval/<name>/...) but not trained on, e.g. an out-of-domain corpus."""

    name: str = ""
    shards: str = ""
    split: str = "val"

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not self.shards:
            raise ValueError("shards: must be set to a directory written by `alum shard`")


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # a directory written by `alum shard`
    tokenizer: str = (
        ""  # the tokenizer directory the shards were made with (checked by fingerprint); default: model.init_from
    )
    train_split: str = "train"
    val_split: str = "val"
    # instead of shards: a weighted mixture of shard directories (pipeline/data/mixture.py), e.g.
    # [{name: wiki, shards: DIR, weight: 3}, {name: books, shards: DIR, weight: 1}]
    sources: tuple[SourceConfig, ...] = ()

    def __post_init__(self) -> None:
        _unique_names("sources", self.sources)


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
    sets: tuple[EvalSetConfig, ...] = ()  # more shard directories to validate on, not trained on

    def __post_init__(self) -> None:
        checks.fraction("mask_rate", self.mask_rate, one=False)
        _unique_names("sets", self.sets)


def _unique_names(key: str, entries: tuple) -> None:
    names = [entry.name for entry in entries]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{key}: the name {name!r} is given twice (names key the metrics)")


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
    config = build_dataclass(RunConfig, data)
    if (not config.data.tokenizer or config.data.tokenizer.startswith(PLACEHOLDER)) and config.model.init_from:
        # A published model directory holds its tokenizer: the shards must be made with it. A
        # shipped config's placeholder (/path/to/tokenizer) is no setting: it does not win over that.
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=config.model.init_from))
    if config.data.sources and config.data.shards.startswith(PLACEHOLDER):
        # A shipped config's placeholder for data.shards is no setting: a mixture replaces it.
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, shards=""))
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
    _absolute_entry_paths(data, base)


def _absolute_entry_paths(data: dict, base: Path) -> None:
    """The `shards` of LIST_PATH_KEYS' entries made absolute against `base`, in place."""
    for key in LIST_PATH_KEYS:
        section, name = key.split(".")
        entries = data.get(section, {}).get(name) if isinstance(data.get(section), dict) else None
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("shards"), str) and entry["shards"]:
                entry["shards"] = os.path.abspath(os.path.join(base, os.path.expanduser(entry["shards"])))


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
    paths |= {f"data.sources.{s.name}.shards": s.shards for s in config.data.sources}
    paths |= {f"eval.sets.{s.name}.shards": s.shards for s in config.eval.sets}
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
    if key in LIST_PATH_KEYS:
        _absolute_entry_paths(data, Path.cwd())


def _require_data(config: RunConfig) -> None:
    """The keys with no usable default; data.tokenizer may come from model.init_from, so after that."""
    if not config.data.shards and not config.data.sources:
        raise UserError(
            "data.shards: must be set to a directory written by `alum shard` (or data.sources to a mixture of them)"
        )
    if config.data.shards and config.data.sources:
        raise UserError("data.sources: give data.shards (one corpus) or data.sources (a mixture), not both")
    if not config.data.tokenizer:
        raise UserError(
            "data.tokenizer: must be set to the tokenizer directory the shards were made with (or set model.init_from)"
        )


def to_dict(config: RunConfig) -> dict:
    """The config as plain YAML/JSON data (its tuples of entries as lists)."""
    return dataclasses.asdict(config, dict_factory=lambda items: {k: _listed(v) for k, v in items})


def _listed(value):
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


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
