"""The config layer: run YAMLs, dotted overrides and DeepSpeed JSONs (model sizes: test_model_sizes.py).

Fast unit tests (no engines, no training): every shipped config loads and says what it
claims, and every bad key, type or combination is a `UserError` naming the key or file.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from helpers import REPO, minimal, raises_naming, write_yaml

from data_prep.errors import UserError
from pipeline.data.curriculum import MaskSchedule
from pipeline.methods.adversarial import AdversarialConfig
from pipeline.train.config import (
    CheckpointConfig,
    EvalConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
    load_config,
    missing_paths,
)
from pipeline.train.deepspeed_setup import deepspeed_config, zero_stage

RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DEEPSPEED_JSONS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
MODEL_SIZES = sorted((REPO / "configs" / "models").glob("*.yaml"))
PAPER_SCHEDULE = MaskSchedule(kind="stepwise", start=0.05, end=0.25, increment=0.05, every=0.2)


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Config files name each other relative to the repository root, as users run them."""
    monkeypatch.chdir(REPO)


def expected_bf16() -> bool:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.device_name() != "cpu" and accelerator.is_bf16_supported()


# --- the shipped configs --------------------------------------------------------------


def test_the_shipped_configs_are_all_found():
    names = {p.name for p in RUN_CONFIGS}
    assert {"demo.yaml", "tiny.yaml", "bert-base.yaml", "bert-large.yaml", "roberta-base-continual.yaml"} <= names
    assert {"zero2-offload.json", "zero3-offload.json"} <= {p.name for p in DEEPSPEED_JSONS}
    assert {"tiny.yaml", "tiny-no-dropout.yaml", "bert-base.yaml", "bert-large.yaml"} <= {p.name for p in MODEL_SIZES}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_loads_and_fills_a_deepspeed_config(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    train = config.train
    assert train.global_batch_size % train.micro_batch_size == 0
    assert config.masking.schedule == PAPER_SCHEDULE
    assert config.adversarial.method == "alum"
    assert config.adversarial.alpha == 10.0  # ALUM.md: alpha 10 for pretraining
    for world_size in (1, train.global_batch_size // train.micro_batch_size):
        ds = deepspeed_config(config.deepspeed, config.train, world_size)
        assert ds["train_batch_size"] == train.global_batch_size
        assert ds["train_micro_batch_size_per_gpu"] == train.micro_batch_size
        assert ds["gradient_accumulation_steps"] * train.micro_batch_size * world_size == train.global_batch_size
        assert ds["gradient_clipping"] == train.grad_clip
        assert ds["bf16"]["enabled"] is (expected_bf16() if train.precision == "auto" else train.precision == "bf16")
        assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("name", ["bert-base.yaml", "bert-large.yaml", "roberta-base-continual.yaml"])
def test_the_big_runs_log_online_and_use_batch_256(name):
    config = load_config(REPO / "configs" / name)
    assert config.wandb.mode == "online"
    assert config.train.global_batch_size == 256
    assert config.train.precision == "auto"
    assert config.adversarial.eps is None
    assert (config.adversarial.steps, config.adversarial.norm) == (1, "linf")


def test_bert_base_recipe():
    config = load_config(REPO / "configs" / "bert-base.yaml")
    assert config.model.config == str(REPO / "configs/models/bert-base.yaml")
    assert config.model.init_from is None
    assert (config.train.max_steps, config.train.micro_batch_size) == (1_000_000, 32)
    assert (config.train.lr, config.train.warmup_steps) == (1e-4, 10_000)
    assert 0 < config.adversarial.start_step < config.train.max_steps  # standard MLM first, then ALUM
    assert zero_stage(deepspeed_config(config.deepspeed, config.train, 8)) == 2


def test_bert_large_uses_zero3_and_activation_checkpointing():
    config = load_config(REPO / "configs" / "bert-large.yaml")
    assert config.model.config == str(REPO / "configs/models/bert-large.yaml")
    assert config.model.activation_checkpointing is True
    assert 0 < config.adversarial.start_step < config.train.max_steps
    ds = deepspeed_config(config.deepspeed, config.train, 16)
    assert zero_stage(ds) == 3
    assert ds["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("name, beta2", [("roberta-base", 0.98), ("bert-base-cased", 0.999)])
def test_continual_configs_follow_the_paper(name, beta2):
    config = load_config(REPO / "configs" / f"{name.split('-')[0]}-base-continual.yaml")
    assert config.model.init_from == f"/path/to/{name}"  # a placeholder, obviously one
    assert config.data.tokenizer == config.model.init_from  # the published directory's own tokenizer
    assert (config.train.lr, config.train.max_steps, config.train.global_batch_size) == (4e-5, 100_000, 256)
    assert config.adversarial.start_step == 0
    assert config.adversarial.alpha == 10.0
    assert config.train.adam_beta2 == beta2


# --- overrides and typing -------------------------------------------------------------


def test_dotted_overrides_use_yaml_typing(tmp_path):
    config = load_config(
        minimal(tmp_path, adversarial={"eps": 1.0e-5}),
        [
            "train.max_steps=7",
            "adversarial.eps=null",
            "adversarial.grad_eps=1e-12",
            "train.lr=3e-4",
            "model.activation_checkpointing=true",
            "wandb.mode=offline",
            "masking.schedule.start=0.1",
        ],
    )
    assert config.train.max_steps == 7 and type(config.train.max_steps) is int
    assert config.adversarial.eps is None
    assert config.adversarial.grad_eps == 1e-12 and type(config.adversarial.grad_eps) is float
    assert config.train.lr == 3e-4 and type(config.train.lr) is float
    assert config.model.activation_checkpointing is True
    assert config.wandb.mode == "offline"
    assert config.masking.schedule.start == 0.1


def test_an_int_is_accepted_where_a_float_is_expected(tmp_path):
    config = load_config(minimal(tmp_path), ["adversarial.alpha=1"])
    assert config.adversarial.alpha == 1.0 and type(config.adversarial.alpha) is float


def test_overrides_win_over_the_file_and_defaults_fill_the_rest(tmp_path):
    config = load_config(minimal(tmp_path, train={"max_steps": 50, "lr": 1.0e-3}), ["train.max_steps=9"])
    assert (config.train.max_steps, config.train.lr) == (9, 1e-3)
    assert config.train.global_batch_size == 32  # the dataclass default
    assert config.masking.schedule == PAPER_SCHEDULE


def test_inline_deepspeed_mapping(tmp_path):
    config = load_config(minimal(tmp_path, deepspeed={"zero_optimization": {"stage": 1}}))
    assert zero_stage(deepspeed_config(config.deepspeed, config.train, 1)) == 1


@pytest.mark.parametrize(
    ("sections", "overrides", "key"),
    [
        ({"trian": {"max_steps": 1}}, [], "trian"),
        ({"train": {"max_step": 1}}, [], "train.max_step"),
        ({"masking": {"schedule": {"kind": "stepwise", "rate": 0.1}}}, [], "masking.schedule.rate"),
        ({}, ["adversarial.alhpa=10"], "adversarial.alhpa"),
        ({}, ["bogus=1"], "bogus"),
        ({}, ["masking.schedule.evry=0.5"], "masking.schedule.evry"),
    ],
)
def test_unknown_keys_are_named_in_full(tmp_path, sections, overrides, key):
    with pytest.raises(UserError, match=f"^{re.escape(key)}: unknown config key"):
        load_config(minimal(tmp_path, **sections), overrides)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_steps=ten", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.lr=fast", "train.lr"),
        ("model.activation_checkpointing=maybe", "model.activation_checkpointing"),
        ("train.micro_batch_size=null", "train.micro_batch_size"),
        ("deepspeed=3", "deepspeed"),
        ("train=5", "train"),
    ],
)
def test_wrong_types_are_named(tmp_path, override, key):
    with pytest.raises(UserError, match=f"^{re.escape(key)}: "):
        load_config(minimal(tmp_path), [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.lr=nan",
            "train.lr: must be a finite number >= 0, got nan",
        ),  # was "another config than rank 0" (NaN != NaN)
        ("train.lr=inf", "train.lr: must be a finite number >= 0, got inf"),  # was trained: NaN losses, exit 0
        ("train.lr=-1", "train.lr: must be a finite number >= 0, got -1.0"),  # was Adam's ValueError traceback
        ("train.adam_beta2=1", "train.adam_beta2: must be in [0, 1), got 1.0"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio: must be in [0, 1], got 1.5"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be a finite number >= 0, got -0.1"),
        ("train.warmup_steps=-1", "train.warmup_steps: must be at least 0, got -1"),
        ("train.dist_timeout_s=0", "train.dist_timeout_s: must be a finite number > 0, got 0.0"),
    ],
)
def test_optimizer_and_schedule_numbers_out_of_range_are_named(tmp_path, override, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        load_config(minimal(tmp_path), [override])


def test_nan_settings_count_as_the_same_on_every_rank():
    from data_prep.differences import first_difference

    assert first_difference({"a": {"b": float("nan")}}, {"a": {"b": float("nan")}}) is None
    assert first_difference({"a": float("nan")}, {"a": 1.0}) is not None


def test_a_near_miss_key_gets_a_suggestion_and_an_unknown_config_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(
        UserError, match=r"^train\.max_step: unknown config key \(did you mean train\.max_steps\? known: "
    ):
        load_config(minimal(tmp_path), ["train.max_step=3"])
    with pytest.raises(UserError, match=r"^nope: file not found \(shipped configs, by name: bert-base, .*\btiny\)$"):
        load_config("nope")


def test_a_wrong_type_in_the_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"^train\.max_steps: expected int, got 'ten'"):
        load_config(minimal(tmp_path, train={"max_steps": "ten"}))


def test_an_override_needs_key_and_value(tmp_path):
    with pytest.raises(UserError, match="key=value"):
        load_config(minimal(tmp_path), ["train.max_steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with raises_naming("nope.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match=re.escape(str(bad)) + ": not valid YAML"):
        load_config(bad)


def test_data_paths_are_required(tmp_path):
    with raises_naming("data.shards"):
        load_config(write_yaml(tmp_path / "run.yaml", {"data": {"tokenizer": "t"}}))
    with raises_naming("data.tokenizer"):
        load_config(write_yaml(tmp_path / "run.yaml", {"data": {"shards": "s"}}))


# --- cross-field and component validation ---------------------------------------------


def test_global_batch_must_be_a_multiple_of_the_micro_batch(tmp_path):
    with pytest.raises(
        UserError, match=re.escape("train.global_batch_size: must be a multiple of micro_batch_size (8), got 30")
    ):
        load_config(minimal(tmp_path, train={"global_batch_size": 30, "micro_batch_size": 8}))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_steps=0", "train.max_steps"),
        ("train.precision=fp8", "train.precision"),
        ("wandb.mode=cloud", "wandb.mode"),
        ("eval.mask_rate=1.5", "eval.mask_rate"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ],
)
def test_out_of_range_values_are_named(tmp_path, override, key):
    with raises_naming(key):
        load_config(minimal(tmp_path), [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("adversarial.method=sgd", "adversarial.method"),
        ("adversarial.norm=l1", "adversarial.norm"),
        ("adversarial.perturb_at=logits", "adversarial.perturb_at"),
        ("adversarial.steps=0", "adversarial.steps"),
        ("adversarial.start_step=-1", "adversarial.start_step"),
        ("adversarial.alpha=-1", "adversarial.alpha"),
        ("adversarial.eps=0", "adversarial.eps"),
        ("adversarial.grad_eps=0", "adversarial.grad_eps"),
        ("adversarial.noise_std=.nan", "adversarial.noise_std"),
        ("masking.schedule.kind=cosine", "masking.schedule.kind"),
        ("masking.schedule.start=0.5", "masking.schedule.start"),
        ("masking.schedule.end=1.5", "masking.schedule.end"),
        ("masking.schedule.increment=0", "masking.schedule.increment"),
        ("masking.schedule.every=0", "masking.schedule.every"),
    ],
)
def test_component_validation_surfaces_as_user_error(tmp_path, override, key):
    with pytest.raises(UserError, match=f"^{re.escape(key)}: "):
        load_config(minimal(tmp_path), [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=0", "train.max_steps: must be at least 1, got 0"),
        ("train.stop_signals=SIGTERM,TERM", "train.stop_signals: 'TERM' is not a signal name (e.g. SIGTERM,SIGUSR1)"),
        (
            "adversarial.method=x",
            "adversarial.method: expected none, alum, alum_amortized, smart, fgsm, fgm, pgd, freeat, freelb, yopo or "
            "asa, got 'x'",
        ),
        ("adversarial.steps=0", "adversarial.steps: must be at least 1, got 0"),
        ("adversarial.asa.tau=-1", "adversarial.asa.tau: must be a finite number >= 0, got -1.0"),
        (
            "adversarial.asa.layers=0,a",
            "adversarial.asa.layers: expected all or layer indices such as 0,1,2, got '0,a'",
        ),
        ("masking.schedule.start=1.5", "masking.schedule.start: must be in (0, 1], got 1.5"),
        ("masking.schedule.start=0.3", "masking.schedule.start: must be <= end (0.25), got 0.3"),
        ("wandb.init_timeout_s=0", "wandb.init_timeout_s: must be a finite number > 0, got 0.0"),
    ],
)
def test_the_loader_puts_the_key_path_in_front_once(tmp_path, override, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        load_config(minimal(tmp_path), [override])


@pytest.mark.parametrize(
    ("cls", "changes", "message"),
    [
        (TrainConfig, {"max_steps": 0}, "max_steps: must be at least 1, got 0"),
        (TrainConfig, {"max_steps": 1.5}, "max_steps: expected an integer, got 1.5"),
        (
            TrainConfig,
            {"peak_tflops": -1.0},
            "peak_tflops: must be a finite number >= 0 (0: known GPUs by name), got -1.0",
        ),
        (TrainConfig, {"precision": "fp8"}, "precision: expected auto, fp32, bf16 or fp16, got 'fp8'"),
        (EvalConfig, {"mask_rate": 1.0}, "mask_rate: must be in (0, 1), got 1.0"),
        (CheckpointConfig, {"keep_last": 0}, "keep_last: must be at least 1, got 0"),
        (WandbConfig, {"fallback": "retry"}, "fallback: expected offline or error, got 'retry'"),
        (MaskSchedule, {"kind": "cosine"}, "kind: expected stepwise, linear or constant, got 'cosine'"),
        (AdversarialConfig, {"alpha": float("inf")}, "alpha: must be a finite number >= 0, got inf"),
    ],
)
def test_a_section_built_directly_checks_its_own_fields(cls, changes, message):
    """Code that builds a section gets the loader's checks, naming the field without a path."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**changes)


def test_a_section_rebuilt_with_replace_is_checked_again():
    train = TrainConfig(global_batch_size=32, micro_batch_size=8)
    assert dataclasses.replace(train, micro_batch_size=16).micro_batch_size == 16
    with pytest.raises(ValueError, match=r"^global_batch_size: must be a multiple of micro_batch_size \(12\), got 32$"):
        dataclasses.replace(train, micro_batch_size=12)


def test_overrides_may_come_before_and_after_the_options():
    from pipeline.train.pretrain import parse_args

    args = parse_args(
        ["--config", "configs/tiny.yaml", "train.max_steps=3", "--run-dir", "runs/x", "train.lr=1e-4", "--local_rank=1"]
    )
    assert (args.config, args.run_dir, args.local_rank) == ("configs/tiny.yaml", "runs/x", 1)
    assert args.overrides == ["train.max_steps=3", "train.lr=1e-4"]


def test_every_option_shows_its_default_in_help():
    from pipeline.cli import build_parser

    shard = build_parser()._subparsers._group_actions[0].choices["shard"].format_help()
    assert "(default: line)" in shard and "(default: 0.01)" in " ".join(shard.split())


def test_decay_steps_keeps_the_schedule_when_max_steps_is_raised():
    import torch

    from pipeline.train.deepspeed_setup import make_scheduler

    def lrs(train, steps):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)
        scheduler = make_scheduler(optimizer, train)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    base = TrainConfig(max_steps=40, warmup_steps=4, lr=1e-3, min_lr_ratio=0.1)
    assert lrs(base, 45)[40:] != lrs(dataclasses.replace(base, max_steps=80), 45)[40:]  # the decay moves
    fixed = dataclasses.replace(base, decay_steps=40)
    extended = lrs(dataclasses.replace(fixed, max_steps=80), 60)
    assert extended[:41] == lrs(fixed, 41)
    assert extended[40:] == pytest.approx([1e-4] * 20)


def test_config_paths_work_from_any_folder(tmp_path, monkeypatch):
    """Paths in a YAML file are relative to it, on the command line to the current folder;
    a shipped config can be named; every missing path is reported at once."""
    from pipeline.train.config import missing_paths

    monkeypatch.chdir(tmp_path)
    by_name = load_config("tiny", ["data.shards=shards", "data.tokenizer=tok"])
    by_path = load_config(REPO / "configs" / "tiny.yaml", ["data.shards=shards", "data.tokenizer=tok"])
    assert by_name == by_path
    assert by_name.model.config == str(REPO / "configs" / "models" / "tiny.yaml")
    assert by_name.deepspeed == str(REPO / "configs" / "deepspeed" / "zero2.json")
    assert by_name.data.shards == str(tmp_path / "shards")

    mine = tmp_path / "project" / "run.yaml"
    mine.parent.mkdir()
    mine.write_text(
        "data: {shards: data/shards, tokenizer: data/tok}\nmodel: {config: nope.yaml}\ndeepspeed: ds.json\n"
    )
    config = load_config(mine)
    assert config.data.shards == str(mine.parent / "data" / "shards")
    with pytest.raises(UserError) as error:
        missing_paths(config)
    message = str(error.value)
    for key, path in (
        ("data.shards", "data/shards"),
        ("data.tokenizer", "data/tok"),
        ("model.config", "nope.yaml"),
        ("deepspeed", "ds.json"),
    ):
        assert f"{key}: {mine.parent / path}" in message
    assert "\n" not in message


def test_the_tiny_configs_guard_floor_lies_below_its_measured_term_and_above_rounding():
    """configs/tiny.yaml tripped its own guard at step 85 with the default floor (1e-5): its term
    measured 1.2e-6 at ALUM's first steps (WikiText-2, 150-step run), the official magnitudes' ~1e-11."""
    floor = load_config("tiny").adversarial.vanish_ratio
    assert 1e-11 < floor < 1.2e-6


def test_a_shipped_configs_placeholder_paths_are_no_setting(tmp_path):
    """`--config tiny model.init_from=DIR` failed on data.tokenizer's placeholder (/path/to/tokenizer)
    instead of taking the model directory's tokenizer, its documented default."""
    config = load_config("tiny", ["data.shards=/data/shards", "model.init_from=/models/roberta-base"])
    assert (config.data.shards, config.data.tokenizer) == ("/data/shards", "/models/roberta-base")
    with pytest.raises(
        UserError,
        match=r"^data\.shards, data\.tokenizer: still the config's placeholder \(/path/to/shards\); "
        r"set data\.shards=\.\.\. on the command line or in the config$",
    ):
        missing_paths(load_config("tiny"))
