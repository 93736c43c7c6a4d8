"""DeepSpeed JSONs: every shipped one is valid for the installed DeepSpeed, and the run
config, not the JSON, owns batch sizes, optimizer, schedule and precision."""

from __future__ import annotations

import json
import re

import pytest
from deepspeed.accelerator import get_accelerator
from helpers import REPO, minimal

from data_prep.errors import UserError
from pipeline.train.config import load_config
from pipeline.train.deepspeed_setup import deepspeed_config, zero_stage

DEEPSPEED_JSONS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Config files name each other relative to the repository root, as users run them."""
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=lambda p: p.name)
def test_every_deepspeed_json_is_valid(path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    raw = json.loads(path.read_text())
    config = load_config(REPO / "configs" / "tiny.yaml", [f"deepspeed={path.relative_to(REPO)}"])
    # tiny: global 32 = micro 8 x 2 ranks x 2 accumulation
    ds = deepspeed_config(config.deepspeed, config.train, world_size=2)
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == raw["zero_optimization"]
    # DeepSpeed's own model of the section forbids unknown keys: the key names are valid for this version.
    zero = DeepSpeedZeroConfig(**raw["zero_optimization"])
    assert zero.stage == zero_stage(ds)
    if "offload" in path.stem:
        assert zero.offload_optimizer.device == "cpu"
        assert zero.offload_optimizer.pin_memory is True
        assert (zero.offload_param is not None and zero.offload_param.device == "cpu") is (zero.stage == 3)


def test_offload_jsons_have_the_expected_stages():
    stages = {p.stem: zero_stage(json.loads(p.read_text())) for p in DEEPSPEED_JSONS}
    assert stages["zero2-offload"] == 2
    assert stages["zero3-offload"] == 3


def test_deepspeed_config_needs_a_world_size_that_divides_the_batch(tmp_path):
    config = load_config(minimal(tmp_path, train={"global_batch_size": 32, "micro_batch_size": 8}))
    assert deepspeed_config(config.deepspeed, config.train, 4)["gradient_accumulation_steps"] == 1
    with pytest.raises(UserError, match="world size 3"):
        deepspeed_config(config.deepspeed, config.train, 3)


@pytest.mark.parametrize("key", ["optimizer", "scheduler", "train_batch_size", "gradient_accumulation_steps"])
def test_deepspeed_json_may_not_set_what_the_run_config_owns(tmp_path, key):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 2}, key: {"type": "AdamW"} if key in ("optimizer", "scheduler") else 8}
        )
    )
    config = load_config(minimal(tmp_path), [f"deepspeed={path}"])
    with pytest.raises(UserError, match=f"deepspeed: remove '{key}'"):
        deepspeed_config(config.deepspeed, config.train, 1)


def test_deepspeed_json_missing_or_invalid(tmp_path):
    config = load_config(minimal(tmp_path), [f"deepspeed={tmp_path / 'nope.json'}"])
    with pytest.raises(UserError, match="no such DeepSpeed config file"):
        deepspeed_config(config.deepspeed, config.train, 1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    config = load_config(minimal(tmp_path), [f"deepspeed={bad}"])
    with pytest.raises(UserError, match=re.escape(str(bad)) + ": not valid JSON"):
        deepspeed_config(config.deepspeed, config.train, 1)


FP16 = bool(get_accelerator().is_fp16_supported())


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [
        ("fp32", False, False),
        ("bf16", True, False),
        pytest.param(
            "fp16", False, True, marks=pytest.mark.skipif(not FP16, reason="this machine's accelerator has no fp16")
        ),
    ],
)
def test_explicit_precision_is_written_into_the_deepspeed_config(tmp_path, precision, bf16, fp16):
    config = load_config(minimal(tmp_path), [f"train.precision={precision}"])
    ds = deepspeed_config(config.deepspeed, config.train, 1)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)


@pytest.mark.skipif(FP16, reason="this machine's accelerator has fp16 (a CPU with AVX512-FP16/AMX)")
def test_a_precision_the_accelerator_lacks_is_refused_by_key(tmp_path):
    config = load_config(minimal(tmp_path), ["train.precision=fp16"])
    device = get_accelerator().device_name()
    with pytest.raises(UserError) as refused:
        deepspeed_config(config.deepspeed, config.train, 1)
    assert (
        str(refused.value)
        == f"train.precision=fp16: this machine's accelerator ({device}) does not support fp16; use bf16 or fp32"
    )
