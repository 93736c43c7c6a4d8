"""The FLOPs formula behind perf/mfu (pipeline.flops), against PyTorch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM

from pipeline.flops import flops_per_token, mfu, model_flops_per_token, peak_flops
from pipeline.model import MaskedLM


@pytest.mark.parametrize("hidden, layers, intermediate, vocab, seq_len", [(64, 2, 256, 2000, 64), (96, 3, 384, 3000, 128)])
def test_the_formula_counts_every_matmul_of_a_training_step(hidden, layers, intermediate, vocab, seq_len):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=intermediate, max_position_embeddings=seq_len, attn_implementation="sdpa")
    model = MaskedLM(BertForMaskedLM(config))
    batch = 3
    ids = torch.randint(5, vocab, (batch, seq_len))
    masked = torch.rand(batch, seq_len) < 0.15
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(ids, torch.ones_like(ids), masked.flatten().nonzero()[:, 0])
        logits.logsumexp(-1).sum().backward()
    rate = masked.sum().item() / masked.numel()
    assert model_flops_per_token(config, seq_len, rate) * batch * seq_len == counter.get_total_flops()
    assert model_flops_per_token(config, seq_len, rate) == flops_per_token(hidden, layers, intermediate, vocab, seq_len, rate)


def test_bert_base_costs_about_six_flops_per_parameter_per_token():
    # 85M encoder weights, 512 tokens, 15% masked: 6N plus the attention and head terms.
    per_token = flops_per_token(768, 12, 3072, 30522, 512, 0.15)
    assert per_token == 6 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 12 * 12 * 768 * 512 + 0.15 * 6 * (768**2 + 768 * 30522)
    assert 5.6e8 < per_token < 5.9e8


def test_the_peak_is_the_configured_one_else_a_known_gpus_else_unknown():
    assert peak_flops("NVIDIA H100 80GB HBM3", 0) == 989e12
    assert peak_flops("NVIDIA A10G", 0) == 70e12 and peak_flops("NVIDIA A10", 0) == 125e12
    assert peak_flops("NVIDIA H100 80GB HBM3", 500) == 500e12
    assert peak_flops("cpu", 0) is None and peak_flops("cpu", 2.5) == 2.5e12
    assert mfu(1e9, 1e5, 1e14, 2) == pytest.approx(0.5)
