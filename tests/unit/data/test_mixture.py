"""The mixture's sample order on real shards of three corpora (WikiText-2, Tiny Shakespeare,
SST-2 sentences): shares, repeats, purity, world-size independence; and its config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import data_file, pretrain, refused_in_one_line

from data_prep import output_dir
from data_prep.corpus import ReadOptions
from data_prep.errors import UserError
from data_prep.inputs import expand_inputs
from data_prep.shard import ShardSettings, shard_corpus
from data_prep.tokenizer import train_tokenizer
from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import Batches, ShardDataset
from pipeline.data.masking import MaskVocab
from pipeline.data.mixture import BLOCK, Mixture, MixtureOrder
from pipeline.train.config import dump, load_config
from pipeline.train.rundir import COMMAND, CONFIG, resolve_run_config
from pipeline.train.training_data import open_training_data

WEIGHTS = (5.0, 3.0, 2.0)


@pytest.fixture(scope="module")
def mixture(train_shards, shakespeare_shards, sst2_shards) -> Mixture:
    return Mixture([ShardDataset(d, "train") for d in (train_shards, shakespeare_shards, sst2_shards)], list(WEIGHTS))


def sources_of(mixture: Mixture, ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(mixture.order.offsets, ids, side="right") - 1


def test_the_corpora_differ_in_size_so_the_weights_are_not_their_sizes(mixture):
    sizes = mixture.order.sizes
    assert sizes[2] * 10 < sizes[0] and sizes[1] != sizes[0]  # SST-2 is small: at 20% it repeats


def test_observed_shares_follow_the_weights(mixture):
    # 200 steps of 32 samples: each share within 3 points of its weight (a block's slots are
    # shuffled, so a partial block is a sample of it: ~0.6 points of standard deviation here).
    ids = np.concatenate([mixture.batch_indices(step * 32, 32, seed=0) for step in range(200)])
    shares = np.bincount(sources_of(mixture, ids), minlength=3) / len(ids)
    assert np.abs(shares - np.array(WEIGHTS) / 10).max() < 0.03, shares
    # Over a whole block the shares are exact to 1/BLOCK.
    block = np.bincount(sources_of(mixture, mixture.batch_indices(BLOCK, BLOCK, seed=0)), minlength=3)
    assert np.abs(block / BLOCK - np.array(WEIGHTS) / 10).max() <= 1 / BLOCK, block


def test_a_small_source_repeats_each_epoch_whole_and_reshuffled(mixture):
    n = mixture.order.sizes[2]
    ids = mixture.batch_indices(0, 20 * n, seed=0)  # at 20%: about 4 of the small source's epochs
    rows = ids[sources_of(mixture, ids) == 2] - mixture.order.offsets[2]
    epochs = [rows[e * n : (e + 1) * n] for e in range(len(rows) // n)]
    assert len(epochs) >= 3
    for epoch, following in zip(epochs, epochs[1:] + [None]):
        assert np.array_equal(np.sort(epoch), np.arange(n))
        assert following is None or not np.array_equal(epoch, following)
    counted = mixture.order.consumed(len(ids), seed=0)
    assert counted.tolist() == np.bincount(sources_of(mixture, ids), minlength=3).tolist()


@pytest.mark.parametrize("start", [0, 13, BLOCK - 7])  # across a block boundary too
def test_any_window_is_the_same_part_of_the_stream(start):
    order = MixtureOrder((1000, 37, 5000), WEIGHTS)
    stream = order.samples(0, BLOCK + 100, seed=4)
    assert np.array_equal(order.samples(start, 64, seed=4), stream[start : start + 64])
    assert not np.array_equal(order.samples(start, 64, seed=5), stream[start : start + 64])


def test_every_row_has_one_id_and_reads_its_sources_row(mixture, shakespeare_shards):
    ids = mixture.batch_indices(0, 512, seed=1)
    from_shakespeare = ids[sources_of(mixture, ids) == 1]
    assert len(from_shakespeare) > 100
    expected = ShardDataset(shakespeare_shards, "train").rows(from_shakespeare - mixture.order.offsets[1])
    assert np.array_equal(mixture.rows(from_shakespeare), expected)
    assert len(np.unique(ids)) == len(ids) - len(ids[sources_of(mixture, ids) == 2]) + len(
        np.unique(ids[sources_of(mixture, ids) == 2])
    )  # only the small source, in a later epoch, repeats a row


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_global_batches_are_the_same_on_any_number_of_ranks(mixture, bert_tokenizer, world_size):
    vocab = MaskVocab.of(load_tokenizer(bert_tokenizer))

    def batches(rank: int, world: int) -> Batches:
        return Batches(mixture, vocab, global_batch_size=16, micro_batch_size=4, seed=2, rank=rank, world_size=world)

    for step, consumed in [(1, 0), (7, 96), (300, 4800)]:
        one = batches(0, 1).for_step(step, consumed, rate=0.15)
        parts = [batches(rank, world_size).for_step(step, consumed, rate=0.15) for rank in range(world_size)]
        for part in parts:
            assert np.array_equal(part.global_indices, one.global_indices)
        ids = np.concatenate([b.input_ids.numpy() for part in parts for b in part.micro_batches])
        assert np.array_equal(ids, np.concatenate([b.input_ids.numpy() for b in one.micro_batches]))


@pytest.fixture(scope="module")
def sst2_text(tmp_path_factory) -> Path:
    text = tmp_path_factory.mktemp("sst2-text") / "sst2.txt"
    lines = data_file("sst2/dev.tsv").read_text().splitlines()[1:]
    text.write_text("".join(line.split("\t")[0] + "\n" for line in lines))
    return text


@pytest.fixture(scope="module")
def short_rows(tmp_path_factory, sst2_text, bert_tokenizer) -> Path:
    """SST-2 in 32-token rows: the right tokenizer, another seq_len."""
    out = tmp_path_factory.mktemp("short-rows") / "shards"
    shard_corpus([str(sst2_text)], bert_tokenizer, out, settings=ShardSettings(seq_len=32, val_fraction=0.1))
    return out


@pytest.fixture(scope="module")
def other_tokenizer_rows(tmp_path_factory, sst2_text) -> Path:
    """SST-2 shards made with a tokenizer of its own."""
    root = tmp_path_factory.mktemp("other-tokenizer")
    train_tokenizer(expand_inputs([str(sst2_text)]), ReadOptions(), root / "tokenizer", vocab_size=600, threads=2)
    shard_corpus([str(sst2_text)], root / "tokenizer", root / "shards", settings=ShardSettings(seq_len=64))
    return root / "shards"


def mixture_config(bert_tokenizer, sources: dict[str, Path], *overrides: str):
    listed = ", ".join(f"{{name: {name}, shards: {path}}}" for name, path in sources.items())
    return load_config("tiny", [f"data.tokenizer={bert_tokenizer}", f"data.sources=[{listed}]", *overrides])


@pytest.mark.parametrize("bad", ["short_rows", "other_tokenizer_rows"])
def test_a_source_of_another_seq_len_or_tokenizer_is_refused_naming_it(request, bad, train_shards, bert_tokenizer):
    config = mixture_config(bert_tokenizer, {"wiki": train_shards, "odd": request.getfixturevalue(bad)})
    with pytest.raises(UserError) as refused:
        open_training_data(config, load_tokenizer(bert_tokenizer), rank=0, world_size=1)
    message = str(refused.value)
    assert message.startswith("data.sources odd (") and "\n" not in message
    assert ("seq_len 32, but data.sources wiki" if bad == "short_rows" else "another tokenizer") in message


def test_an_eval_set_of_another_seq_len_is_refused_naming_it(train_shards, bert_tokenizer, short_rows):
    config = mixture_config(
        bert_tokenizer, {"wiki": train_shards}, "eval.every_steps=2", f"eval.sets=[{{name: ood, shards: {short_rows}}}]"
    )
    with pytest.raises(UserError, match=r"^eval.sets ood \(.*seq_len 32"):
        open_training_data(config, load_tokenizer(bert_tokenizer), rank=0, world_size=1)


def test_every_source_and_eval_set_is_validated_under_its_name(
    train_shards, shakespeare_shards, sst2_shards, bert_tokenizer
):
    config = mixture_config(
        bert_tokenizer,
        {"wiki": train_shards, "shakespeare": shakespeare_shards},
        "eval.every_steps=2",
        f"eval.sets=[{{name: sst2, shards: {sst2_shards}}}]",
    )
    data = open_training_data(config, load_tokenizer(bert_tokenizer), rank=0, world_size=1)
    assert list(data.val_sets) == ["wiki", "shakespeare", "sst2"]
    assert len(data.val_sets["sst2"]) == len(ShardDataset(sst2_shards, "val"))
    record = data.record(1000, seed=0)
    assert record["data/wiki/consumed_samples"] + record["data/shakespeare/consumed_samples"] == 1000
    assert record["data/wiki/epoch"] == record["data/wiki/consumed_samples"] // len(ShardDataset(train_shards, "train"))


def test_a_changed_source_is_refused_on_resume_by_its_key_and_a_new_eval_set_is_not(
    tmp_path, train_shards, shakespeare_shards, sst2_shards, bert_tokenizer
):
    wiki, play = f"{{name: wiki, shards: {train_shards}, weight: 3}}", f"{{name: play, shards: {shakespeare_shards}}}"
    sources = f"data.sources=[{wiki}, {play}]"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    output_dir.mark(run_dir, COMMAND)
    (run_dir / CONFIG).write_text(dump(load_config("tiny", [f"data.tokenizer={bert_tokenizer}", sources])))
    with pytest.raises(UserError, match=r"this run was started with data.sources.wiki.weight=3.0, not 2.0"):
        resolve_run_config(
            None, [f"data.tokenizer={bert_tokenizer}", sources.replace("weight: 3", "weight: 2")], run_dir
        )
    with pytest.raises(UserError, match=r"started with data.sources.books=None, not \{'name': 'books'"):
        resolve_run_config(None, [sources.replace("play", "books")], run_dir)
    added = resolve_run_config(None, [f"eval.sets=[{{name: sst2, shards: {sst2_shards}}}]"], run_dir)
    assert [s.name for s in added.eval.sets] == ["sst2"] and added.data.sources[0].weight == 3.0


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["short_rows", "other_tokenizer_rows"])
def test_training_on_a_mismatched_source_stops_in_one_line_before_set_up(
    request, bad, tmp_path, train_shards, bert_tokenizer
):
    odd = request.getfixturevalue(bad)
    sources = f"data.sources=[{{name: wiki, shards: {train_shards}}}, {{name: odd, shards: {odd}}}]"
    result = pretrain(tmp_path / "run", train_shards, bert_tokenizer, "data.shards=''", sources, world=1, stage=0)
    refused_in_one_line(result, f"data.sources odd ({odd})", "seq_len 32" if bad == "short_rows" else "tokenizer")
    assert not (tmp_path / "run").exists()  # refused before the run directory, the model or the engine


def test_the_progress_line_shows_each_named_sets_validation():
    from pipeline.train.pretrain import _progress_line

    record = {
        "train/loss": 7.5,
        "train/loss_mlm": 7.5,
        "train/loss_adv": 0.0,
        "train/mask_rate": 0.05,
        "train/lr": 1e-3,
        "perf/tokens_per_s": 1000.0,
        "eval/wiki/ppl": 812.25,
        "eval/wiki/loss": 6.7,
        "eval/sst2/ppl": 1500.0,
    }
    assert _progress_line(4, 8, record).endswith(" | eval ppl wiki 812.2, sst2 1500.0")
