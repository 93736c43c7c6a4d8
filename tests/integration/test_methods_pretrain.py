"""Each adversarial method in a real 2-rank ZeRO-2 pretraining run: a finite, non-zero
adversarial term on every step beside the clean MLM loss; and SMART (whose teacher is
state), ASA (whose adversaries are) and FreeAT (whose replays span optimizer steps) resumed
mid-run equal to the run that was not interrupted; FreeLB's accumulated passes and ASA under
ZeRO-1 and ZeRO-3 as under ZeRO-2; an ASA run's export is a plain HF masked LM. All runs
share one launch (tests/support/several_runs.py): the launch is most of a short run's cost."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import comparable, ok, pretrain_several, read_metrics

pytestmark = pytest.mark.slow

# Two steps, the method on from the first, no validation and one checkpoint.
SHORT = (
    "train.max_steps=2",
    "adversarial.start_step=0",
    "eval.every_steps=0",
    "checkpoint.every_steps=2",
    "wandb.mode=disabled",
)
CROSS_ENTROPY = ("fgsm", "fgm", "pgd", "freeat", "freelb", "yopo")  # their adversarial term is a cross-entropy
DIVERGENCE = ("alum_amortized", "smart", "asa")  # a symmetric KL
RESUMED = (
    "adversarial.start_step=1",
    "train.decay_steps=6",
    "eval.every_steps=0",
    "checkpoint.every_steps=2",
    "wandb.mode=disabled",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_shards, bert_tokenizer):
    root = tmp_path_factory.mktemp("methods")
    plan = [(root / method, (*SHORT, f"adversarial.method={method}")) for method in (*CROSS_ENTROPY, *DIVERGENCE)]
    for method, steps in (
        ("smart", (4, 2, 4)),
        ("asa", (4, 2, 4)),
        ("freeat", (5, 3, 5)),
    ):  # FreeAT: batch 1 replayed at steps 2-3, 2 at 4-5
        first = (f"adversarial.method={method}", *RESUMED)
        plan += [
            (root / f"{method}-straight", (*first, f"train.max_steps={steps[0]}")),
            *[(root / f"{method}-resumed", (*first, f"train.max_steps={n}")) for n in steps[1:]],
        ]
    plan += [
        (
            root / f"{method}-zero{stage}",
            (*SHORT, f"adversarial.method={method}", f"deepspeed=configs/deepspeed/zero{stage}.json"),
        )
        for method in ("freelb", "asa")
        for stage in (1, 3)
    ]
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


@pytest.mark.parametrize("method", ["smart", "asa", "freeat"])
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


@pytest.mark.parametrize("method", ["freelb", "asa"])
@pytest.mark.parametrize("stage", [1, 3])
def test_every_zero_stage_trains_as_zero2(method, stage, runs):
    """FreeLB: the gradient norm of step 1 is of the passes' accumulated gradient, which a
    pass lost or counted twice at an accumulation boundary would change. ASA: step 2's
    numbers depend on the adversaries' first update as well as the model's."""
    reference, other = read_metrics(runs / method), read_metrics(runs / f"{method}-zero{stage}")
    keys = (
        "train/loss",
        "train/loss_mlm",
        "train/loss_adv",
        "train/grad_norm",
        *(k for k in reference[0] if k.startswith("asa/")),
    )
    for r, expected in zip(other, reference, strict=True):
        for key in keys:
            assert r[key] == pytest.approx(expected[key], rel=1e-5), (r["step"], key)


def test_asa_masks_part_of_the_attention_and_trains_its_adversaries(runs):
    for r in read_metrics(runs / "asa"):
        fractions = [r[f"asa/masked_fraction/layer{i}"] for i in range(2)]
        assert all(0 < f < 1 for f in fractions), r
        assert r["asa/penalty"] > 0 and r["asa/grad_norm"] > 0
    straight = read_metrics(runs / "asa-straight")
    assert [("asa/penalty" in r) for r in straight] == [False, True, True, True]  # ASA from step 1 (the second) on


def test_an_asa_export_is_a_plain_masked_lm_with_the_training_models_clean_logits(runs, tmp_path):
    """The export has no adversary, loads with AutoModelForMaskedLM, and predicts what the
    training model (adversaries attached, through their attention implementation) predicts
    on its clean pass."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from pipeline.methods.asa import AsaConfig, AttentionAdversaries
    from pipeline.model.masked_lm import MaskedLM
    from pipeline.tasks.export import export, load_exported_weights

    run_dir = runs / "asa-straight"
    out = export(run_dir, tmp_path / "hf")
    assert not any("adversar" in key or "asa" in key for key in load_file(out / "model.safetensors"))
    assert "asa" not in (out / "config.json").read_text()
    exported = AutoModelForMaskedLM.from_pretrained(out).eval()
    client = torch.load(
        next((run_dir / "checkpoints" / "step00000004").glob("mp_rank_00_model_states.pt")), weights_only=False
    )
    training = MaskedLM(load_exported_weights(run_dir, "step00000004"))
    adversaries = AttentionAdversaries(training.hf, AsaConfig())
    adversaries.load_state_dict(client[AttentionAdversaries.CLIENT_KEY])
    training.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, exported.config.vocab_size - 64, (3, 24), generator=generator)
    real_tokens = torch.ones_like(ids)
    real_tokens[2, 16:] = 0
    index = torch.arange(ids.numel())
    with torch.no_grad():
        clean = training(ids, real_tokens, index)[0]
        with adversaries.active(real_tokens):
            attacked = training(ids, real_tokens, index)[0]
        plain = exported(input_ids=ids, attention_mask=real_tokens).logits.flatten(0, 1)
    assert torch.equal(plain, clean)
    assert (attacked - clean).abs().max() > 1e-3  # the adversaries are there, and act only when active
