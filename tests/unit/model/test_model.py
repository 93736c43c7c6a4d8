"""MaskedLM (pipeline.model.masked_lm): masked-position logits of the HF model, and the perturbation
added where `adversarial.perturb_at` says, checked against the HF model driven by hand."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from pipeline.model.masked_lm import MaskedLM


def _bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return BertForMaskedLM(config).eval()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (2, 16), generator=generator)
    masked = torch.rand(2, 16, generator=generator) < 0.3
    return ids, torch.ones_like(ids), masked


def test_without_delta_the_logits_are_the_hf_models_at_the_masked_positions():
    hf = _bert()
    ids, attention, masked = _inputs()
    index = masked.flatten().nonzero().squeeze(1)  # as MicroBatch.masked_index
    logits, embedded = MaskedLM(hf)(ids, attention, index)
    assert torch.allclose(logits, hf(input_ids=ids, attention_mask=attention).logits[masked], atol=1e-6)
    assert torch.equal(embedded, hf.bert.embeddings(input_ids=ids))  # the embedding output, unperturbed


def test_delta_at_the_embedding_output_enters_the_encoder_after_the_embedding_layer():
    hf = _bert()
    ids, attention, masked = _inputs()
    index = masked.flatten().nonzero().squeeze(1)  # as MicroBatch.masked_index
    delta = 0.1 * torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    logits, embedded = MaskedLM(hf, "embedding_output")(ids, attention, index, delta)
    with torch.no_grad():
        states = hf.bert.encoder(hf.bert.embeddings(input_ids=ids) + delta).last_hidden_state
    assert torch.allclose(logits, hf.cls(states[masked]), atol=1e-6)
    assert torch.equal(embedded, hf.bert.embeddings(input_ids=ids))


def test_delta_at_the_word_embeddings_enters_before_positions_and_layer_norm():
    hf = _bert()
    ids, attention, masked = _inputs()
    index = masked.flatten().nonzero().squeeze(1)  # as MicroBatch.masked_index
    delta = 0.1 * torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    logits, embedded = MaskedLM(hf, "word_embeddings")(ids, attention, index, delta)
    words = hf.bert.embeddings.word_embeddings(ids)
    expected = hf(inputs_embeds=words + delta, attention_mask=attention).logits[masked]
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.equal(embedded, words)
    assert not torch.allclose(logits, MaskedLM(hf, "word_embeddings")(ids, attention, index)[0], atol=1e-3)
