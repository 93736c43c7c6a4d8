"""The FLOPs formula behind perf/mfu (pipeline.train.flops), against PyTorch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM

from pipeline.model.masked_lm import MaskedLM
from pipeline.train.flops import flops_per_token, mfu, model_flops_per_token, peak_flops


@pytest.mark.parametrize(
    "hidden, layers, intermediate, vocab, seq_len", [(64, 2, 256, 2000, 64), (96, 3, 384, 3000, 128)]
)
def test_the_formula_counts_every_matmul_of_a_training_step(hidden, layers, intermediate, vocab, seq_len):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=seq_len,
        attn_implementation="sdpa",
    )
    model = MaskedLM(BertForMaskedLM(config))
    batch = 3
    ids = torch.randint(5, vocab, (batch, seq_len))
    masked = torch.rand(batch, seq_len) < 0.15
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(ids, torch.ones_like(ids), masked.flatten().nonzero()[:, 0])
        logits.logsumexp(-1).sum().backward()
    rate = masked.sum().item() / masked.numel()
    assert model_flops_per_token(config, seq_len, rate) * batch * seq_len == counter.get_total_flops()
    assert model_flops_per_token(config, seq_len, rate) == flops_per_token(
        hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab, seq_len=seq_len, mask_rate=rate
    )


def test_bert_base_costs_about_six_flops_per_parameter_per_token():
    # 85M encoder weights, 512 tokens, 15% masked: 6N plus the attention and head terms.
    per_token = flops_per_token(hidden=768, layers=12, intermediate=3072, vocab=30522, seq_len=512, mask_rate=0.15)
    assert per_token == 6 * 12 * (4 * 768**2 + 2 * 768 * 3072) + 12 * 12 * 768 * 512 + 0.15 * 6 * (768**2 + 768 * 30522)
    assert 5.6e8 < per_token < 5.9e8


@pytest.mark.parametrize(
    "name, bf16, fp16, fp32",
    [
        ("NVIDIA H100 80GB HBM3", 989, 989, 67),
        ("NVIDIA H100 PCIe", 756, 756, 51),
        ("NVIDIA H100 NVL", 835, 835, 60),
        ("NVIDIA H200", 989, 989, 67),
        ("NVIDIA A100-SXM4-80GB", 312, 312, 19.5),
        ("NVIDIA A100-PCIE-40GB", 312, 312, 19.5),
        ("NVIDIA A100 80GB PCIe", 312, 312, 19.5),
        ("NVIDIA L40S", 362, 362, 91.6),
        ("NVIDIA L40", 181, 181, 90.5),
        ("NVIDIA L4", 121, 121, 30.3),
        ("NVIDIA A10", 125, 125, 31.2),
        ("Tesla V100-SXM2-32GB", None, 125, 15.7),
        ("Tesla V100-PCIE-16GB", None, 112, 14),
    ],
)
def test_each_gpu_has_its_own_data_sheet_peak_per_precision(name, bf16, fp16, fp32):
    # Dense figures; fp32 is the CUDA-core one (TF32 is left off). V100 has no bf16: no peak, no MFU.
    peaks = [peak_flops(name, precision, 0) for precision in ("bf16", "fp16", "fp32")]
    assert peaks == [None if tflops is None else tflops * 1e12 for tflops in (bf16, fp16, fp32)]


def test_a_name_is_never_matched_by_a_part_of_it():
    # "NVIDIA L40" contains "NVIDIA L4", "NVIDIA H100 PCIe" contains "H100": each gets its own figure.
    assert peak_flops("NVIDIA L40", "bf16", 0) == 181e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16", 0) == 756e12
    assert peak_flops("NVIDIA A10G", "bf16", 0) == 70e12 and peak_flops("NVIDIA A10G", "fp32", 0) is None
    assert peak_flops("NVIDIA H100", "bf16", 0) is None and peak_flops("NVIDIA GeForce RTX 4090", "bf16", 0) is None


def test_the_configured_peak_wins_and_a_cpu_has_none():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", 500) == 500e12
    assert peak_flops("cpu", "fp32", 0) is None and peak_flops("cpu", "fp32", 2.5) == 2.5e12
    assert mfu(1e9, 1e5, 1e14, 2) == pytest.approx(0.5)
