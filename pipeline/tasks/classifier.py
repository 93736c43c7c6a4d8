"""The sequence classifier `alum finetune` trains: an HF BERT/RoBERTa model whose embeddings can
be perturbed, loaded from a model directory with a seeded new head, and the encoding, padding,
predicted labels and accuracy of labelled examples. Apart from the training loop
(pipeline/tasks/finetune.py), which is the only part that knows about seeds, ranks and DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from data_prep.errors import UserError
from pipeline.model.masked_lm import ARCHS, Perturbation


class Classifier(nn.Module):
    """An HF sequence classifier whose embeddings can be perturbed (for ALUM)."""

    def __init__(self, hf_model: nn.Module, perturb_at: str = "embedding_output"):
        super().__init__()
        self.hf = hf_model
        self.perturbation = Perturbation(getattr(hf_model, hf_model.base_model_prefix), perturb_at)

    def forward(self, input_ids, attention_mask, delta=None):
        """(logits [B, num_labels], the perturbable embeddings [B, T, H])."""
        return self.perturbation.run(delta, lambda: self.hf(input_ids=input_ids, attention_mask=attention_mask).logits)


def load_model(model_dir: str | Path, num_labels: int, seed: int, perturb_at: str = "embedding_output"):
    """(Classifier, tokenizer) from a BERT/RoBERTa directory; the new head is seeded; delta goes where
    ``perturb_at`` says (the method's `adversarial.perturb_at`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
    logging.disable_progress_bar()
    path = check_model_dir(model_dir)
    torch.manual_seed(seed)
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=num_labels, attn_implementation="sdpa"
    )
    return Classifier(hf, perturb_at), AutoTokenizer.from_pretrained(str(path))


def check_model_dir(model_dir: str | Path) -> Path:
    """A BERT/RoBERTa HF directory, checked from its config.json alone (before any loading)."""
    path = Path(model_dir)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise UserError(f"--model: {path}: not a Hugging Face model directory (no readable config.json)") from None
    if model_type not in ARCHS:
        raise UserError(f"--model: {path}: model type {model_type!r} is not BERT or RoBERTa")
    return path


def encode(tokenizer, examples, max_length: int) -> tuple[list[list[int]], torch.Tensor]:
    """Token ids per example (truncated to max_length, pairs joined the tokenizer's way) and labels."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    ids = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    return ids, torch.tensor([e.label for e in examples])


def padded(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded to its longest row: (input_ids, attention_mask)."""
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def predict(
    model: Classifier,
    ids,
    *,
    pad_id: int,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The predicted label of each of `ids`, in their order, computed and left on `device` (the CPU by
    default), so a caller's accuracy and per-example predictions come from one evaluation pass."""
    model.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            input_ids, mask = (t.to(device) for t in padded(ids[start : start + batch_size], pad_id))
            predicted.append(model(input_ids, mask)[0].argmax(-1))
    model.train()
    return torch.cat(predicted)


def share_correct(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of `predicted` equal to `labels`: the accuracy."""
    return (predicted == labels.to(predicted.device)).sum().item() / len(labels)


def label_digits(predicted: torch.Tensor, num_labels: int) -> str | list[int]:
    """Predicted labels as one string of digits ("0110..."), compact in a result.json; a task with more than
    10 labels, whose ids need more than one digit, gets a list of ints instead."""
    values = predicted.tolist()
    return "".join(map(str, values)) if num_labels <= 10 else values
