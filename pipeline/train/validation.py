"""Validation: masked-LM loss, perplexity and accuracy at a fixed masking of the val split.

The same rows with the same masks every time, whatever the number of ranks: the first
`eval.batches` x `train.micro_batch_size` rows of the split, masked at `eval.mask_rate`
with a fixed seed, split over the ranks as a training batch is; so values are comparable
across steps, runs and world sizes. Every rank runs the same number of forwards (ZeRO-3
gathers parameters in each): the rows are padded to a multiple of ranks x micro-batch with
repeats that count for nothing. Dropout is off, so evaluation leaves the training RNG
untouched. Beside the accuracy it reports that of always guessing the commonest masked token
of those rows: the level a model reaches by learning token frequencies alone, which an
accuracy must beat to show that the model uses context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.batches import masked_batch
from pipeline.data.sampling import rank_slice
from pipeline.model.mlm_score import MlmScore

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.train.config import RunConfig

EVAL_SEED_OFFSET = 7919


def evaluate(engine: DeepSpeedEngine, dataset, config: RunConfig, vocab) -> dict:
    import deepspeed.comm as dist  # here, not at the top: `alum eval` imports this module's constant, and no DeepSpeed

    rank, world_size = dist.get_rank(), dist.get_world_size()
    micro = config.train.micro_batch_size
    rows = config.eval.batches * micro
    padded = -(-rows // (world_size * micro)) * world_size * micro
    mine = rank_slice(np.arange(padded, dtype=np.int64), rank, world_size)
    score = MlmScore(vocab.vocab_size, engine.device)
    engine.eval()
    with torch.no_grad():
        for start in range(0, len(mine), micro):
            positions = mine[start : start + micro]
            batch = masked_batch(
                dataset,
                positions % rows % len(dataset),
                step=0,
                seed=config.train.seed + EVAL_SEED_OFFSET,
                rate=config.eval.mask_rate,
                vocab=vocab,
            )
            batch = batch.on(engine.device)
            # 1 for the labels of the first `rows` positions, 0 for the padding's repeats.
            counted = (
                torch.from_numpy(positions < rows).to(engine.device)[batch.masked_index // dataset.seq_len].double()
            )
            logits, _ = engine(batch.input_ids, batch.attention_mask, batch.masked_index)
            score.add(logits, batch.labels, counted)
    engine.train()
    score.all_reduce(dist.all_reduce)
    metrics = {**score.metrics(), "commonest_token_accuracy": score.commonest_token_accuracy()}
    return {f"eval/{name}": value for name, value in metrics.items()}


class Evaluator:
    """Validation on its schedule: every eval.every_steps steps, when there is a val split."""

    def __init__(self, engine: DeepSpeedEngine, dataset, config: RunConfig, vocab):
        self.engine, self.dataset, self.config, self.vocab = engine, dataset, config, vocab

    def due(self, step: int) -> bool:
        return self.dataset is not None and step % self.config.eval.every_steps == 0

    def __call__(self) -> dict:
        return evaluate(self.engine, self.dataset, self.config, self.vocab)
