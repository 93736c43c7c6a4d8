"""Each adversarial method in a real 2-rank ZeRO-2 pretraining run: a finite, non-zero
adversarial term on every step beside the clean MLM loss; and SMART (whose teacher is
state) and FreeAT (whose replays span optimizer steps) resumed mid-run equal to the run
that was not interrupted; FreeLB's accumulated passes under ZeRO-1 and ZeRO-3 as under ZeRO-2.
All runs share one
launch (tests/several_runs.py): the launch is most of a short run's cost."""

from __future__ import annotations

import math

import pytest

from helpers import comparable, ok, pretrain_several, read_metrics

pytestmark = pytest.mark.slow

# Two steps, the method on from the first, no validation and one checkpoint.
SHORT = ("train.max_steps=2", "adversarial.start_step=0", "eval.every_steps=0", "checkpoint.every_steps=2", "wandb.mode=disabled")
CROSS_ENTROPY = ("fgsm", "fgm", "pgd", "freeat", "freelb", "yopo")  # their adversarial term is a cross-entropy
DIVERGENCE = ("alum_amortized", "smart")  # a symmetric KL
RESUMED = ("adversarial.start_step=1", "train.decay_steps=6", "eval.every_steps=0", "checkpoint.every_steps=2", "wandb.mode=disabled")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_shards, bert_tokenizer):
    root = tmp_path_factory.mktemp("methods")
    plan = [(root / method, (*SHORT, f"adversarial.method={method}")) for method in (*CROSS_ENTROPY, *DIVERGENCE)]
    for method, steps in (("smart", (4, 2, 4)), ("freeat", (5, 3, 5))):  # FreeAT: batch 1 replayed at steps 2-3, 2 at 4-5
        first = (f"adversarial.method={method}", *RESUMED)
        plan += [(root / f"{method}-straight", (*first, f"train.max_steps={steps[0]}")),
                 *[(root / f"{method}-resumed", (*first, f"train.max_steps={n}")) for n in steps[1:]]]
    plan += [(root / f"freelb-zero{stage}", (*SHORT, "adversarial.method=freelb", f"deepspeed=configs/deepspeed/zero{stage}.json"))
             for stage in (1, 3)]
    ok(pretrain_several(plan, train_shards, bert_tokenizer, world=2, stage=2))
    return root


@pytest.mark.parametrize("method", [*CROSS_ENTROPY, *DIVERGENCE])
def test_a_two_rank_zero2_run_has_a_finite_non_zero_adversarial_term(method, runs):
    records = read_metrics(runs / method)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["train/loss_adv"]) and r["train/loss_adv"] > 0, r
        assert r["train/adv_active"] == 1 and r["train/adv_skipped"] == 0
        if method in CROSS_ENTROPY:  # an adversarial cross-entropy is of the clean one's order of magnitude
            assert 0.5 < r["train/loss_adv"] / r["train/loss_mlm"] < 2
        else:  # a divergence between nearby predictions: small beside the clean loss
            assert r["train/loss_adv"] < r["train/loss_mlm"]


@pytest.mark.parametrize("method", ["smart", "freeat"])
def test_a_resumed_run_equals_the_uninterrupted_one(method, runs):
    straight, resumed = read_metrics(runs / f"{method}-straight"), read_metrics(runs / f"{method}-resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] and len(straight) >= 4
    assert comparable(resumed) == comparable(straight)


def test_freeat_replays_each_batch_and_counts_it_once(runs):
    records = read_metrics(runs / "freeat")
    assert records[0]["data/sample_digest"] == records[1]["data/sample_digest"]
    assert [r["data/consumed_samples"] for r in records] == [0, 16]
    assert records[1]["train/delta_norm"] > 0 and records[1]["train/loss_adv"] != records[0]["train/loss_adv"]


def test_smart_proximal_term_is_in_the_loss(runs):
    straight = read_metrics(runs / "smart-straight")
    # From the second update on the teacher differs from the student: the proximal term is in the loss.
    for r in straight[2:]:
        assert r["train/loss"] - r["train/loss_mlm"] - 10.0 * r["train/loss_adv"] > 1e-6, r


@pytest.mark.parametrize("stage", [1, 3])
def test_freelb_accumulates_its_passes_under_every_zero_stage(stage, runs):
    """The gradient norm of step 1 is of the passes' accumulated gradient: a pass lost or
    counted twice at an accumulation boundary would change it."""
    reference, other = read_metrics(runs / "freelb"), read_metrics(runs / f"freelb-zero{stage}")
    for r, expected in zip(other, reference, strict=True):
        for key in ("train/loss", "train/loss_mlm", "train/loss_adv", "train/grad_norm"):
            assert r[key] == pytest.approx(expected[key], rel=1e-5), (r["step"], key)
