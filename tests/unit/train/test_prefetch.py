"""The loop's prefetch (pipeline.train.prefetch.StepInputs): the batch built for step N + 1 before
step N's read-back is exactly the one the loop built after counting step N, across mask-rate
changes and FreeAT's replays, and the loop then uses it without building it again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import Batches, ShardDataset, StepBatches
from pipeline.data.masking import MaskVocab
from pipeline.data.sampling import epoch_fraction
from pipeline.methods.registry import method_of
from pipeline.train.config import load_config
from pipeline.train.prefetch import StepInputs
from pipeline.train.resume import TrainState
from pipeline.train.step import StepStats, advance_state, consumed_after

COUNTED = StepStats(
    loss=1.0,
    loss_mlm=1.0,
    loss_adv=0.0,
    delta_norm=0.0,
    adv_grad_norm=0.0,
    delta_lost=0.0,
    nonfinite=False,
    adv_skipped=False,
    stop=False,
)


def same(a: StepBatches, b: StepBatches) -> bool:
    return (
        np.array_equal(a.global_indices, b.global_indices)
        and len(a.micro_batches) == len(b.micro_batches)
        and all(
            torch.equal(x.input_ids, y.input_ids)
            and torch.equal(x.masked_index, y.masked_index)
            and torch.equal(x.labels, y.labels)
            and (x.attention_mask is None) == (y.attention_mask is None)
            for x, y in zip(a.micro_batches, b.micro_batches)
        )
    )


@pytest.mark.parametrize("method", ["alum", "freeat"])
def test_the_prefetched_batch_is_the_one_the_loop_built_after_counting_the_step(train_shards, bert_tokenizer, method):
    # 1,024 samples a step: the mask rate steps up every 0.2 epoch (~1,064 samples) of the 5,318 rows
    config = load_config(
        "tiny",
        [
            f"data.shards={train_shards}",
            f"data.tokenizer={bert_tokenizer}",
            "train.global_batch_size=1024",
            "train.micro_batch_size=512",
            f"adversarial.method={method}",
            "adversarial.start_step=3",
            "adversarial.steps=2",
        ],
    )
    dataset = ShardDataset(train_shards, "train")
    batches = Batches(
        dataset,
        MaskVocab.of(load_tokenizer(bert_tokenizer)),
        global_batch_size=1024,
        micro_batch_size=512,
        seed=config.train.seed,
    )
    inputs, state = StepInputs(batches, config), TrainState()
    rates, consumed = [], []
    for _ in range(12):
        inputs(state.step, state.consumed_samples)  # this step's
        ahead = inputs(
            state.step + 1, consumed_after(config, state.step + 1, state.consumed_samples)
        )  # the next, before the read-back
        advance_state(state, COUNTED, config, engine=None)
        # what the loop built before prefetching, from the state after the step was counted
        rate = config.masking.schedule.rate(epoch_fraction(state.consumed_samples, len(dataset)))
        built = batches.for_step(
            state.step - method_of(config.adversarial).replay_index(state.step), state.consumed_samples, rate
        )
        assert same(ahead[0], built) and ahead[1] == rate
        assert inputs(state.step, state.consumed_samples)[0] is ahead[0]  # the loop takes it as it is
        rates.append(rate)
        consumed.append(state.consumed_samples)
    assert len(set(rates)) >= 3  # the rate changed on the way
    replays = sum(a == b for a, b in zip(consumed, consumed[1:]))
    assert replays == (
        5 if method == "freeat" else 0
    )  # FreeAT from step 3, 2 replays: a first replay (steps 3, 5, ..., 11) consumes nothing
