import numpy as np
import pytest

from pipeline.data.masking import MaskVocab, mask_tokens

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = [PAD, UNK, CLS, SEP]
VOCAB = 1000


def make_batch(rows: int, seq_len: int, seed: int = 0, pad: int = 0) -> np.ndarray:
    """Rows shaped like the shards': [CLS] text [SEP], then `pad` padding tokens."""
    ids = np.random.default_rng(seed).integers(MASK + 1, VOCAB, size=(rows, seq_len))
    ids[:, 0] = CLS
    ids[:, seq_len - pad - 1] = SEP
    ids[:, seq_len - pad :] = PAD
    return ids


def mask(ids, indices=None, step=0, seed=0, rate=0.15, special=SPECIAL, vocab=VOCAB):
    indices = np.arange(len(ids)) if indices is None else np.asarray(indices)
    return mask_tokens(ids, indices, step=step, seed=seed, rate=rate, vocab=MaskVocab(tuple(special), MASK, PAD, vocab))


@pytest.mark.parametrize("rate", [0.15, 1.0])
def test_special_tokens_and_padding_are_never_selected_or_changed(rate):
    ids = make_batch(16, 64, pad=20)
    ids[3, 10] = UNK
    out = mask(ids, rate=rate)
    special = np.isin(ids, SPECIAL)
    assert not out.masked[special].any()
    assert np.array_equal(out.input_ids[special], ids[special])
    assert out.masked[~special].any()


def test_labels_are_the_original_ids_at_the_positions_and_the_rest_is_untouched():
    ids = make_batch(8, 128)
    out = mask(ids, rate=0.3)
    assert out.labels.dtype == np.int64 and out.input_ids.dtype == np.int64
    assert np.array_equal(out.labels, ids[out.masked])
    assert np.array_equal(out.input_ids[~out.masked], ids[~out.masked])
    assert np.count_nonzero(out.input_ids != ids) > 0


@pytest.mark.parametrize("rate", [0.05, 0.15, 0.25])
def test_realised_rate_matches_the_requested_rate(rate):
    ids = make_batch(64, 512)
    out = mask(ids, rate=rate)
    maskable = ~np.isin(ids, SPECIAL)
    assert abs(out.masked.sum() / maskable.sum() - rate) < 0.01


def test_80_10_10_split_of_selected_tokens():
    ids = make_batch(64, 512)
    out = mask(ids, rate=1.0)
    chosen, original = out.input_ids[out.masked], ids[out.masked]
    masked = np.mean(chosen == MASK)
    kept = np.mean(chosen == original)
    replaced = np.mean((chosen != MASK) & (chosen != original))
    assert abs(masked - 0.8) < 0.01
    assert abs(replaced - 0.1) < 0.01
    assert abs(kept - 0.1) < 0.01


def test_random_replacements_are_uniform_over_non_special_ids():
    vocab, special, original = 14, [0, 1, 6, 9], 5  # special ids in the middle of the vocabulary too
    others = [i for i in range(vocab) if i not in special + [MASK, original]]
    out = mask(np.full((64, 512), original), rate=1.0, special=special, vocab=vocab)
    chosen = out.input_ids[out.masked]
    counts = np.bincount(chosen[(chosen != MASK) & (chosen != original)], minlength=vocab)
    assert counts[special + [MASK]].sum() == 0
    expected = len(chosen) * 0.1 / (len(others) + 1)  # the draw may also hit the original id
    assert np.all(np.abs(counts[others] - expected) < 0.2 * expected)


def test_same_row_masks_identically_in_any_batch():
    ids = make_batch(6, 64, seed=2)
    first = mask(ids[[0, 1, 2]], indices=[10, 20, 30], step=7, seed=3, rate=0.2)
    other = mask(ids[[1, 5]], indices=[20, 99], step=7, seed=3, rate=0.2)  # other neighbours and slot
    assert np.array_equal(first.input_ids[1], other.input_ids[0])
    assert np.array_equal(first.masked[1], other.masked[0])
    assert not np.array_equal(first.masked[0], other.masked[1])


def test_mask_depends_on_step_seed_and_sample_index():
    ids = make_batch(4, 128)
    base = mask(ids, step=1, seed=0, rate=0.2)
    assert np.array_equal(base.input_ids, mask(ids, step=1, seed=0, rate=0.2).input_ids)
    for changed in (
        mask(ids, step=2, seed=0, rate=0.2),
        mask(ids, step=1, seed=1, rate=0.2),
        mask(ids, indices=[4, 5, 6, 7], step=1, rate=0.2),
    ):
        assert not np.array_equal(base.masked, changed.masked)


def test_every_row_gets_a_selected_token_even_at_a_tiny_rate():
    ids = make_batch(32, 16)
    ids[5] = PAD  # a row with nothing to mask stays untouched
    out = mask(ids, rate=1e-6)
    counts = out.masked.sum(axis=1)
    assert counts[5] == 0 and np.array_equal(out.input_ids[5], ids[5])
    assert np.all(np.delete(counts, 5) == 1)
    assert not out.masked[np.isin(ids, SPECIAL)].any()


def test_uint16_input_masks_like_int32():
    vocab = 65_000
    ids = np.random.default_rng(3).integers(MASK + 1, vocab, size=(4, 32))
    ids[:, 0] = CLS
    out16 = mask(ids.astype(np.uint16), rate=0.5, vocab=vocab)
    out32 = mask(ids.astype(np.int32), rate=0.5, vocab=vocab)
    assert out16.input_ids.dtype == np.int64 and out16.labels.dtype == np.int64
    assert np.array_equal(out16.input_ids, out32.input_ids)
    assert np.array_equal(out16.labels, ids[out16.masked])
    assert out16.labels.max() > np.iinfo(np.int16).max


def test_mask_is_pinned_because_resumed_runs_depend_on_it():
    ids = np.arange(10, 26).reshape(2, 8)
    out = mask(ids, indices=[0, 1], step=0, seed=1, rate=0.3)
    rows, cols = out.masked.nonzero()
    assert (rows.tolist(), cols.tolist()) == ([0, 0, 1, 1, 1, 1], [0, 4, 3, 5, 6, 7])
    # one random replacement (906), one kept token (ids[1, 6] == 24), the rest [MASK]
    assert out.input_ids.tolist() == [[906, 11, 12, 13, 4, 15, 16, 17], [18, 19, 20, 4, 22, 4, 24, 4]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"indices": [0]}, "sample_indices"),
        ({"vocab": 50}, "input ids"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mask(make_batch(2, 8), **kwargs)
