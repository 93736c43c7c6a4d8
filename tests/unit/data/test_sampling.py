import hashlib

import numpy as np
import pytest

from pipeline.data.sampling import epoch_fraction, global_batch_indices, permute, rank_slice, sample_digest


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4096, 65537])
@pytest.mark.parametrize("seed", [0, 1, 987654321])
def test_permute_is_a_bijection(n, seed):
    order = permute(np.arange(n), n, seed, epoch=3)
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(n))


def test_permute_is_elementwise_so_any_subset_can_be_computed_alone():
    n = 10_007
    full = permute(np.arange(n), n, seed=5, epoch=0)
    picks = np.array([9_999, 0, 17, 17, 10_006])
    assert np.array_equal(permute(picks, n, seed=5, epoch=0), full[picks])


def test_epochs_and_seeds_give_different_orders():
    n = 1000
    base = permute(np.arange(n), n, seed=0, epoch=0)
    assert not np.array_equal(base, permute(np.arange(n), n, seed=0, epoch=1))
    assert not np.array_equal(base, permute(np.arange(n), n, seed=1, epoch=0))
    assert np.array_equal(base, permute(np.arange(n), n, seed=0, epoch=0))


def test_order_looks_shuffled():
    n = 1000
    order = permute(np.arange(n), n, seed=0, epoch=0)
    assert np.count_nonzero(order == np.arange(n)) < 10
    assert abs(np.corrcoef(order, np.arange(n))[0, 1]) < 0.15


def test_order_is_pinned_because_resuming_old_runs_depends_on_it():
    assert permute(np.arange(10), 10, seed=0, epoch=0).tolist() == [9, 2, 7, 0, 5, 3, 1, 4, 8, 6]


def test_global_batches_cover_each_epoch_exactly_once():
    n, g = 100, 10
    epoch = np.concatenate([global_batch_indices(i * g, g, n, seed=3) for i in range(n // g)])
    assert np.array_equal(np.sort(epoch), np.arange(n))
    assert np.array_equal(epoch, permute(np.arange(n), n, seed=3, epoch=0))


def test_batches_straddle_epochs_without_dropping_or_repeating():
    n, g, seed = 100, 32, 4
    stream = np.concatenate([global_batch_indices(i * g, g, n, seed) for i in range(7)])
    assert np.array_equal(stream[:100], permute(np.arange(100), n, seed, epoch=0))
    assert np.array_equal(stream[100:200], permute(np.arange(100), n, seed, epoch=1))
    assert np.array_equal(stream[200:], permute(np.arange(24), n, seed, epoch=2))
    straddling = global_batch_indices(96, g, n, seed)
    assert np.array_equal(np.sort(straddling[:4]), np.sort(stream[96:100]))


def test_batch_larger_than_the_dataset_spans_several_epochs():
    n = 5
    batch = global_batch_indices(3, 12, n, seed=0)
    assert np.array_equal(batch[:2], permute(np.array([3, 4]), n, seed=0, epoch=0))
    assert np.array_equal(np.sort(batch[2:7]), np.arange(n))
    assert np.array_equal(np.sort(batch[7:]), np.arange(n))
    assert not np.array_equal(batch[2:7], batch[7:])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_reassemble_the_global_batch(world_size):
    batch = global_batch_indices(40, 16, 1000, seed=0)
    parts = [rank_slice(batch, rank, world_size) for rank in range(world_size)]
    assert {len(p) for p in parts} == {16 // world_size}
    assert np.array_equal(np.concatenate(parts), batch)


def test_rank_slice_rejects_uneven_split_and_bad_rank():
    batch = np.arange(10)
    with pytest.raises(ValueError, match="does not divide"):
        rank_slice(batch, 0, 4)
    with pytest.raises(ValueError, match="rank 2"):
        rank_slice(batch, 2, 2)


@pytest.mark.parametrize("resume_at", [0, 1, 17, 100, 123, 299])
def test_resuming_from_any_consumed_count_continues_the_same_stream(resume_at):
    n, g, seed = 100, 16, 11
    uninterrupted = np.concatenate([global_batch_indices(i * g, g, n, seed) for i in range(25)])
    resumed = np.concatenate([global_batch_indices(resume_at + i * g, g, n, seed) for i in range(5)])
    assert np.array_equal(resumed, uninterrupted[resume_at : resume_at + 5 * g])


def test_epoch_fraction():
    assert epoch_fraction(0, 1000) == 0.0
    assert epoch_fraction(500, 1000) == 0.5
    assert epoch_fraction(1000, 1000) == 0.0
    assert epoch_fraction(2250, 1000) == 0.25


def test_digest_is_sha256_of_int64_little_endian_bytes():
    indices = np.array([3, 1, 2], dtype=np.int32)
    expected = hashlib.sha256(b"".join(i.to_bytes(8, "little") for i in (3, 1, 2))).hexdigest()[:16]
    assert sample_digest(indices) == expected
    assert sample_digest(indices.astype(np.int64)) == expected


def test_digest_is_order_sensitive():
    assert sample_digest(np.array([1, 2, 3])) != sample_digest(np.array([3, 2, 1]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: permute(np.array([5]), 5, seed=0, epoch=0),
        lambda: permute(np.array([-1]), 5, seed=0, epoch=0),
        lambda: permute(np.array([0]), 0, seed=0, epoch=0),
        lambda: global_batch_indices(-1, 4, 10, seed=0),
        lambda: global_batch_indices(0, 0, 10, seed=0),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
