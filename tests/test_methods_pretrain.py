"""Each adversarial method in a real 2-rank ZeRO-2 pretraining run: a finite, non-zero
adversarial term on every step, and the clean MLM loss logged beside it."""

from __future__ import annotations

import math

import pytest

from helpers import ok, pretrain, read_metrics

pytestmark = pytest.mark.slow

# Two steps, the method on from the first, no validation and one checkpoint: the launch is the cost.
SHORT = ("train.max_steps=2", "adversarial.start_step=0", "eval.every_steps=0", "checkpoint.every_steps=2", "wandb.mode=disabled")


# FGSM is FGM with a sign step (tests/test_gradient_methods.py): its launch would add CI time, not a code path.
@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_a_two_rank_zero2_run_has_a_finite_non_zero_adversarial_term(method, tmp_path, train_shards, bert_tokenizer):
    ok(pretrain(tmp_path / "run", train_shards, bert_tokenizer, *SHORT, f"adversarial.method={method}", world=2, stage=2))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["train/loss_adv"]) and r["train/loss_adv"] > 0, r
        assert r["train/adv_active"] == 1 and r["train/adv_skipped"] == 0
        # An adversarial cross-entropy is at least the clean one's order of magnitude.
        assert 0.5 < r["train/loss_adv"] / r["train/loss_mlm"] < 2
