"""The adversarial term is measurably non-zero for every shipped config, in fp32 and in bf16.

On a small BERT briefly pretrained on WikiText-2 (through the project's MaskedLM, dropout on,
as the trainer runs it), with the model in bf16 for the bf16 case. The floor is
`adversarial.vanish_ratio` (1e-5), chosen from bench/alum_term.py (docs/alum-term.md): the
official code's magnitudes give ratios of 2e-11 (fp32) and 4e-7 (bf16), the defaults 6e-3.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import REPO

from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import Batches, ShardDataset, masked_batch
from pipeline.data.masking import MaskVocab
from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.methods.objective import mlm_loss
from pipeline.model.masked_lm import MaskedLM, build_model, hf_config
from pipeline.train import vanishing
from pipeline.train.config import load_config

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What the shipped configs used before this study: the official code's magnitudes, absolute units.
OLD = AdversarialConfig(method="alum", scale="absolute", step_size=1e-3, noise_std=1e-5, grad_eps=1e-6)


@pytest.fixture(scope="module")
def trained(train_shards, bert_tokenizer):
    """A 64-wide, 2-layer BERT after 200 standard MLM steps of 16 x 64 tokens, and 3 val batches."""
    tokenizer = load_tokenizer(bert_tokenizer)
    train, val = ShardDataset(train_shards, "train"), ShardDataset(train_shards, "val")
    vocab = MaskVocab.of(tokenizer)
    batches = Batches(train, vocab, global_batch_size=16, micro_batch_size=16, seed=0)
    config = hf_config(
        str(REPO / "configs" / "models" / "tiny.yaml"), tokenizer.vocab_size, tokenizer.special_token_ids, train.seq_len
    )
    torch.manual_seed(0)
    torch.set_num_threads(2)
    hf = build_model(config, None, activation_checkpointing=False)
    model = MaskedLM(hf).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        (batch,) = batches.for_step(step, step * 16, 0.15).micro_batches
        loss = mlm_loss(*_logits_and_labels(model, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    batches = [
        masked_batch(val, torch.arange(8 * i, 8 * i + 8).numpy() % len(val), step=0, seed=1, rate=0.15, vocab=vocab)
        for i in range(3)
    ]
    return hf, batches


def _logits_and_labels(model, batch):
    logits, _ = model(batch.input_ids, batch.attention_mask, batch.masked_index)
    return logits, batch.labels


def ratios(trained, config: AdversarialConfig, precision: str) -> list[tuple[float, float, float]]:
    """(L_adv, alpha * L_adv / L_mlm, fraction of delta lost) per val batch."""
    hf, batches = trained
    model = MaskedLM(copy.deepcopy(hf).to(DTYPES[precision]), config.perturb_at).train()
    out = []
    for i, batch in enumerate(batches):
        ids, mask, masked_index = batch.input_ids, batch.attention_mask, batch.masked_index
        torch.manual_seed(i)
        losses = compute_losses(
            lambda d: model(ids, mask, masked_index, d),
            lambda d: model(ids, mask, masked_index, d)[0],
            batch.labels,
            config=config,
            step=0,
            real_tokens=mask,
        )
        assert not losses.skipped
        out.append(
            (
                losses.loss_adv.item(),
                config.alpha * losses.loss_adv.item() / losses.loss_mlm.item(),
                losses.delta_lost.item(),
            )
        )
    return out


@pytest.mark.parametrize("precision", DTYPES)
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_gives_a_measurable_term(trained, path, precision):
    config = replace(load_config(path).adversarial, start_step=0)
    for loss_adv, ratio, lost in ratios(trained, config, precision):
        assert loss_adv > 0
        assert ratio > config.vanish_ratio, f"{path.name} {precision}: alpha * L_adv / L_mlm = {ratio:.2e}"
        assert lost < 0.1  # bench/alum_term.py: 5% of delta lost in bf16 at the defaults


def test_the_old_values_vanish_in_bf16_and_the_guard_fires(trained):
    measured = ratios(trained, OLD, "bf16")
    assert all(ratio < OLD.vanish_ratio for _, ratio, _ in measured)
    assert min(lost for _, _, lost in measured) > 0.8  # 0.90: only the elements dropout set to 0 keep delta
    steps = len(measured)
    lines = guard_lines(replace(OLD, vanish_steps=steps), measured)
    # once, when the streak reaches vanish_steps, and naming bf16 rounding (not the ascent) as the cause
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"warning: step {steps}: the adversarial term has been numerically zero for {steps} active steps"
    ), lines
    assert "of delta's elements vanish when added to the embeddings" in lines[0], lines


def test_the_guard_stays_silent_on_the_defaults(trained):
    config = AdversarialConfig(method="alum", vanish_steps=1)
    for precision in DTYPES:
        assert guard_lines(config, ratios(trained, config, precision)) == []


def guard_lines(config: AdversarialConfig, measured) -> list[str]:
    """What the trainer's guard prints over these steps (each a step of its own)."""
    lines, streak = [], 0
    for step, (_, ratio, lost) in enumerate(measured, 1):
        streak = streak + 1 if vanishing.vanished(config, ratio, lost) else 0
        vanishing.check(config, streak=streak, step=step, ratio=ratio, lost=lost, announce=lines.append)
    return lines
