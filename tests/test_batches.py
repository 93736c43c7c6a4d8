"""A rank's training batches (pipeline.data.Batches): a pure function of (step, consumed
samples, rate), the same global batch whatever the world size, tensors the model can use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data import Batches, ShardDataset
from pipeline.masking import MaskVocab


@pytest.fixture(scope="module")
def source(train_shards, bert_tokenizer):
    return ShardDataset(train_shards, "train"), MaskVocab.of(load_tokenizer(bert_tokenizer))


def batches(source, world_size: int = 1, rank: int = 0, micro: int = 4) -> Batches:
    dataset, vocab = source
    return Batches(dataset, vocab, global_batch_size=16, micro_batch_size=micro, seed=3, rank=rank, world_size=world_size)


def test_the_global_batch_splits_over_ranks_into_the_same_rows_and_masks(source):
    alone = batches(source).for_step(5, 80, 0.2)
    ranks = [batches(source, 2, rank).for_step(5, 80, 0.2) for rank in range(2)]
    assert all(np.array_equal(r.global_indices, alone.global_indices) for r in ranks)
    assert len(alone.micro_batches) == 4 and [len(r.micro_batches) for r in ranks] == [2, 2]
    split = [b for r in ranks for b in r.micro_batches]
    for mine, theirs in zip(alone.micro_batches, split):
        assert torch.equal(mine.input_ids, theirs.input_ids) and torch.equal(mine.labels, theirs.labels)


def test_a_step_is_a_pure_function_of_its_arguments(source):
    first, again = batches(source).for_step(2, 32, 0.15), batches(source).for_step(2, 32, 0.15)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first.micro_batches, again.micro_batches))
    other_step = batches(source).for_step(3, 32, 0.15)
    assert np.array_equal(other_step.global_indices, first.global_indices)  # same samples: the order is keyed on consumed samples
    assert not all(torch.equal(a.masked, b.masked) for a, b in zip(first.micro_batches, other_step.micro_batches))  # new masks


def test_micro_batch_tensors_agree_with_each_other_and_the_rows(source):
    dataset, vocab = source
    step = batches(source, micro=8).for_step(0, 0, 0.25)
    local = step.global_indices[:8]
    batch = step.micro_batches[0]
    rows = torch.from_numpy(dataset.rows(local))
    assert torch.equal(batch.masked_index, batch.masked.flatten().nonzero()[:, 0])
    assert torch.equal(batch.labels, rows[batch.masked])
    assert torch.equal(batch.input_ids[~batch.masked], rows[~batch.masked])
    assert torch.equal(batch.attention_mask, (rows != vocab.pad_id).long())
    assert 0.15 < batch.masked.sum().item() / batch.attention_mask.sum().item() < 0.35
