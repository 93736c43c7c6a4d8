"""Validation: masked-LM loss, perplexity and accuracy at a fixed masking of the val split.

The same rows with the same masks every time (the first `eval.batches` micro-batches per
rank, masked at `eval.mask_rate` with a fixed seed), so values are comparable across steps
and runs; dropout is off, so evaluation leaves the training RNG untouched. Beside the
accuracy it reports that of always guessing the commonest masked token of those rows: the
level a model reaches by learning token frequencies alone, which an accuracy must beat to
show that the model uses context.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import masked_batch
from pipeline.sampling import rank_slice

EVAL_SEED_OFFSET = 7919


def evaluate(engine, dataset, config, vocab) -> dict:
    import deepspeed.comm as dist  # here, not at the top: `alum eval` imports this module's constant, and no DeepSpeed

    rank, world_size = dist.get_rank(), dist.get_world_size()
    micro = config.train.micro_batch_size
    total = config.eval.batches * micro * world_size
    indices = np.arange(total, dtype=np.int64) % len(dataset)
    mine = rank_slice(indices, rank, world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)  # loss sum, correct, tokens
    label_counts = torch.zeros(vocab.vocab_size, dtype=torch.int64, device=engine.device)
    engine.eval()
    with torch.no_grad():
        for start in range(0, len(mine), micro):
            batch = masked_batch(dataset, mine[start : start + micro], 0, config.train.seed + EVAL_SEED_OFFSET, config.eval.mask_rate, vocab)
            batch = batch.on(engine.device)
            labels = batch.labels
            logits, _ = engine(batch.input_ids, batch.attention_mask, batch.masked_index)
            sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            sums[1] += (logits.argmax(-1) == labels).sum()
            sums[2] += labels.numel()
            label_counts += torch.bincount(labels, minlength=vocab.vocab_size)
    engine.train()
    dist.all_reduce(sums)
    dist.all_reduce(label_counts)
    loss = (sums[0] / sums[2]).item()
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), "eval/accuracy": (sums[1] / sums[2]).item(),
            "eval/commonest_token_accuracy": (label_counts.max() / sums[2]).item()}


class Evaluator:
    """Validation on its schedule: every eval.every_steps steps, when there is a val split."""

    def __init__(self, engine, dataset, config, vocab):
        self.engine, self.dataset, self.config, self.vocab = engine, dataset, config, vocab

    def due(self, step: int) -> bool:
        return self.dataset is not None and step % self.config.eval.every_steps == 0

    def __call__(self) -> dict:
        return evaluate(self.engine, self.dataset, self.config, self.vocab)
