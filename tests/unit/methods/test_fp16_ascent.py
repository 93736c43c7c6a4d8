"""The ascent gradient through an fp16 model: with a vocabulary of 30k and hundreds of masked
tokens the loss's gradient at each logit is ~1e-9, below fp16's smallest subnormal, and no loss
scaler sees the ascent. Run on the CPU (which computes fp16 models) against the same model in
float32."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.model.masked_lm import MaskedLM


@pytest.fixture(scope="module")
def weights() -> dict:
    torch.manual_seed(0)
    return BertForMaskedLM(CONFIG).state_dict()


CONFIG = BertConfig(
    vocab_size=30528,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def ascent(weights: dict, dtype: torch.dtype, method: str):
    """(the step's losses, the delta of its adversarial pass) for a batch of 8 x 128 tokens, a quarter masked."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30000, (8, 128), generator=generator)
    index = (torch.rand(8, 128, generator=generator) < 0.25).flatten().nonzero()[:, 0]
    hf = BertForMaskedLM(CONFIG)
    hf.load_state_dict(weights)
    model, mask, deltas = MaskedLM(hf.to(dtype)), torch.ones_like(ids), []

    def forward(delta):
        deltas.append(delta)
        return model(ids, mask, index, delta)

    torch.manual_seed(2)
    out = compute_losses(
        forward,
        lambda d: model(ids, mask, index, d)[0],
        ids.flatten()[index],
        config=AdversarialConfig(method=method),
        step=0,
    )
    return out, deltas[-1]


@pytest.mark.parametrize("method", ["alum", "fgm"])
def test_an_fp16_models_ascent_is_float32s_up_to_rounding(weights, method):
    """ALUM's KL gradient underflowed to exactly 0 (delta stayed the initial noise); a cross-entropy
    gradient has a -1/rows term per row that fp16 keeps, so FGM's lost only its softmax part."""
    fp32, delta32 = ascent(weights, torch.float32, method)
    fp16, delta16 = ascent(weights, torch.float16, method)
    _, delta_bf16 = ascent(weights, torch.bfloat16, method)
    if method == "alum":
        assert 0 < fp32.adv_grad_norm < 1e-7  # per token (measured 1.4e-8): each element is far below fp16's 6e-8
    assert fp16.adv_grad_norm.item() == pytest.approx(fp32.adv_grad_norm.item(), rel=0.01)
    # No further from float32's perturbation than a bf16 model's (measured: ALUM 0.06 and 0.45, FGM 0.0015 and 0.0075).
    assert (delta16 - delta32).norm() < (delta_bf16 - delta32).norm()


def test_float32_and_bf16_ascent_gradients_are_unchanged_by_the_scaling(weights):
    """The gradient is scaled by a power of two: exact in float32 and bf16, so it equals a plain autograd.grad."""
    for dtype in (torch.float32, torch.bfloat16):
        hf = BertForMaskedLM(CONFIG)
        hf.load_state_dict(weights)
        model = MaskedLM(hf.to(dtype))
        ids = torch.randint(5, 30000, (2, 16), generator=torch.Generator().manual_seed(3))
        index, mask = torch.arange(0, 32, 4), torch.ones_like(ids)
        from pipeline.methods.objective import input_gradient, log_probs, nll

        delta = torch.zeros(2, 16, 32, requires_grad=True)
        logits = model(ids, mask, index, delta)[0]
        scaled, finite = input_gradient(lambda q: nll(log_probs(q), ids.flatten()[index]), logits, delta)
        (plain,) = torch.autograd.grad(nll(log_probs(model(ids, mask, index, delta)[0]), ids.flatten()[index]), delta)
        assert finite and torch.equal(scaled, plain.float())
