"""A rank's training batches (pipeline.data.batches.Batches): a pure function of (step, consumed
samples, rate), the same global batch whatever the world size, tensors the model can use,
and no more than the training step copies to the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import Batches, ShardDataset, masked_batch
from pipeline.data.masking import MaskVocab, mask_tokens


@pytest.fixture(scope="module")
def source(train_shards, bert_tokenizer):
    return ShardDataset(train_shards, "train"), MaskVocab.of(load_tokenizer(bert_tokenizer))


def batches(source, world_size: int = 1, rank: int = 0, micro: int = 4) -> Batches:
    dataset, vocab = source
    return Batches(
        dataset, vocab, global_batch_size=16, micro_batch_size=micro, seed=3, rank=rank, world_size=world_size
    )


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
    assert np.array_equal(
        other_step.global_indices, first.global_indices
    )  # same samples: the order is keyed on consumed samples
    assert not all(
        torch.equal(a.masked, b.masked) for a, b in zip(first.micro_batches, other_step.micro_batches)
    )  # new masks


def test_micro_batch_tensors_agree_with_each_other_and_the_rows(source):
    dataset, vocab = source
    step = batches(source, micro=8).for_step(0, 0, 0.25)
    local = step.global_indices[:8]
    batch = step.micro_batches[0]
    rows = torch.from_numpy(dataset.rows(local))
    expected = mask_tokens(rows.numpy(), local, step=0, seed=3, rate=0.25, vocab=vocab)
    assert torch.equal(batch.masked_index, torch.from_numpy(np.flatnonzero(expected.masked)))
    assert torch.equal(batch.masked, torch.from_numpy(expected.masked))
    assert torch.equal(batch.labels, rows[batch.masked])
    assert torch.equal(batch.input_ids[~batch.masked], rows[~batch.masked])
    assert batch.attention_mask is None and (rows != vocab.pad_id).all()  # packed rows: every token real
    assert 0.15 < batch.masked.sum().item() / rows.numel() < 0.35


def test_only_a_micro_batch_with_padding_carries_an_attention_mask(source):
    dataset, vocab = source
    last = len(dataset) - 1  # a split's last row is the only padded one
    rows = torch.from_numpy(dataset.rows(np.array([0, last])))
    assert (rows[1] == vocab.pad_id).any() and (rows[0] != vocab.pad_id).all()
    padded = masked_batch(dataset, np.array([0, last]), step=0, seed=3, rate=0.15, vocab=vocab)
    assert torch.equal(padded.attention_mask, (rows != vocab.pad_id).long())
    assert masked_batch(dataset, np.array([0, 1]), step=0, seed=3, rate=0.15, vocab=vocab).attention_mask is None


class Copies(TorchDispatchMode):
    """Every tensor copy (aten._to_copy), with its non_blocking flag."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            self.non_blocking.append(kwargs.get("non_blocking", False))
        return func(*args, **kwargs)


@pytest.mark.parametrize("indices, copied", [([0, 1], 3), ([0, -1], 4)], ids=["packed", "padded"])
def test_a_micro_batch_goes_to_the_device_in_its_few_tensors_without_blocking(source, indices, copied):
    """ids, masked index and labels, plus the attention mask only with padding; each copy
    non-blocking (asynchronous from the pinned memory the trainer uses on CUDA). The "meta"
    device stands for an accelerator: on CPU, .to("cpu") copies nothing."""
    dataset, vocab = source
    batch = masked_batch(dataset, np.array(indices) % len(dataset), step=0, seed=3, rate=0.15, vocab=vocab)
    with Copies() as copies:
        moved = batch.on(torch.device("meta"))
    assert copies.non_blocking == [True] * copied
    assert moved.input_ids.is_meta and moved.labels.shape == batch.labels.shape
