"""ALUM under DeepSpeed bf16 on the CPU accelerator: the term is real with the defaults, and
the guard stops a run whose term vanishes (the official magnitudes, which bf16 rounds away)."""

from __future__ import annotations

import pytest
from helpers import ok, pretrain, read_metrics

pytestmark = pytest.mark.slow

BF16 = (
    "train.precision=bf16",
    "train.max_steps=4",
    "adversarial.method=alum",
    "adversarial.start_step=2",
    "checkpoint.every_steps=4",
    "eval.every_steps=0",
)


def test_two_rank_bf16_run_has_a_real_adversarial_term(tmp_path, train_shards, bert_tokenizer):
    # The tiny config's adversarial section (the defaults), not the test suite's larger sizes.
    sizes = (
        "adversarial.step_size=0.1",
        "adversarial.noise_std=0.01",
        "adversarial.grad_eps=1e-12",
        "adversarial.vanish_steps=1",
    )
    result = ok(pretrain(tmp_path / "run", train_shards, bert_tokenizer, *BF16, *sizes, world=2, stage=2))
    records = read_metrics(tmp_path / "run")
    assert [r["train/adv_active"] for r in records] == [0, 0, 1, 1]
    for r in records[2:]:
        assert r["train/loss_adv"] > 0
        assert r["train/adv_ratio"] > 1e-5
        assert r["train/delta_lost"] < 0.05
        assert r["train/adv_skipped"] == 0
    assert "numerically zero" not in result.stderr


def test_bf16_run_with_the_official_magnitudes_stops_on_the_guard(tmp_path, train_shards, bert_tokenizer):
    old = (
        "adversarial.scale=absolute",
        "adversarial.step_size=1e-3",
        "adversarial.noise_std=1e-5",
        "adversarial.grad_eps=1e-6",
        "adversarial.on_vanish=error",
        "adversarial.vanish_steps=2",
    )
    result = pretrain(tmp_path / "run", train_shards, bert_tokenizer, *BF16, *old, world=1, stage=0)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("pretrain: error: step 4: the adversarial term has been numerically zero for 2 active steps")
    assert "adversarial.noise_std" in line and "adversarial.scale=relative" in line
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["train/delta_lost"] > 0.8 and r["train/adv_ratio"] < 1e-6 for r in records[2:])  # measured: 0.90, 3e-8
    assert not (tmp_path / "run" / "checkpoints" / "step00000004").exists()
