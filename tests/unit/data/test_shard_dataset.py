"""`ShardDataset` on a real shard directory: its rows, and the shard checks it shares with `alum verify`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import shard_rows

from data_prep import manifest
from data_prep.errors import UserError
from data_prep.shard import ShardSettings, shard_corpus
from pipeline.data.batches import ShardDataset


@pytest.fixture(scope="module")
def several_shards(tmp_path_factory, wikitext_valid, bert_tokenizer):
    """WikiText-2 valid in 0.25 MiB pieces: several shard files (and blocks) per split."""
    out = tmp_path_factory.mktemp("several-shards") / "shards"
    shard_corpus(
        [str(wikitext_valid)],
        bert_tokenizer,
        out,
        settings=ShardSettings(seq_len=64, val_fraction=0.1, piece_bytes=1 << 18),
    )
    return out


@pytest.fixture
def shards(tmp_path, several_shards):
    """A copy to damage."""
    copy = tmp_path / "shards"
    shutil.copytree(several_shards, copy)
    return copy


def first_shard(directory):
    entry = manifest.read(directory)["splits"]["train"]["shards"][0]
    return entry, directory / entry["path"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_rows_are_the_arrow_files_rows(several_shards, split):
    recorded = manifest.read(several_shards)["splits"][split]
    assert len(recorded["shards"]) >= 2  # so that rows() crosses from block to block
    dataset = ShardDataset(several_shards, split)
    expected = shard_rows(several_shards, split)
    assert len(dataset) == len(expected) == recorded["num_sequences"]
    order = np.random.default_rng(0).permutation(len(dataset))
    rows = dataset.rows(order)
    assert rows.dtype == np.int64 and np.array_equal(rows, expected[order])


def test_an_unknown_split_names_the_splits(several_shards):
    with pytest.raises(UserError, match=r"no 'test' split \(splits: train, val\)"):
        ShardDataset(several_shards, "test")


def open_error(directory) -> str:
    """The UserError that opening the train split raises."""
    with pytest.raises(UserError) as error:
        ShardDataset(directory, "train")
    return str(error.value)


def test_a_truncated_shard_is_named(shards):
    entry, path = first_shard(shards)
    path.write_bytes(path.read_bytes()[:-100])
    assert (
        open_error(shards)
        == f"{path}: {entry['bytes'] - 100} bytes, the manifest says {entry['bytes']} (truncated or altered)"
    )


def test_a_missing_shard_is_named(shards):
    _, path = first_shard(shards)
    path.unlink()
    assert open_error(shards) == f"{path}: shard listed in the manifest is missing"


def test_a_row_count_other_than_the_manifests_is_named(shards):
    data = manifest.read(shards)
    entry = data["splits"]["train"]["shards"][0]
    entry["num_rows"] += 1
    manifest.write(shards, data)
    assert (
        open_error(shards)
        == f"{shards / entry['path']}: {entry['num_rows'] - 1} rows, the manifest says {entry['num_rows']}"
    )


def test_a_schema_other_than_the_manifests_is_named(shards):
    manifest.write(shards, {**manifest.read(shards), "dtype": "int32"})
    _, path = first_shard(shards)
    assert open_error(shards) == (
        f"{path}: schema input_ids: fixed_size_list<item: uint16>[64] differs from the expected "
        "input_ids: fixed_size_list<item: int32>[64]"
    )


def test_altered_bytes_of_the_same_size_fail_the_checksum_of_the_rank_that_holds_them(shards):
    entries = manifest.read(shards)["splits"]["train"]["shards"]
    path = shards / entries[1]["path"]
    altered = bytearray(path.read_bytes())
    altered[-200] ^= 0xFF
    path.write_bytes(bytes(altered))
    dataset = ShardDataset(shards, "train")  # opening reads no shard whole
    dataset.verify_checksums(rank=0, world_size=2)  # rank 0 holds shards 0, 2, ...
    for rank, world_size in ((0, 1), (1, 2)):
        with pytest.raises(UserError) as error:
            dataset.verify_checksums(rank, world_size)
        assert str(error.value) == f"{path}: sha256 does not match the manifest (altered)"


@pytest.mark.parametrize("leave", ["absolute", "dotdot", "symlink"])
def test_a_shard_path_leading_outside_the_directory_is_refused_by_training_and_verify(shards, tmp_path, leave):
    """A file outside with the right size and sha256 (what a crafted manifest would list) is
    neither read nor named: the manifest's path is refused before any byte is opened."""
    data = manifest.read(shards)
    entry = data["splits"]["train"]["shards"][0]
    outside = tmp_path / "outside" / "secret.arrow"
    outside.parent.mkdir()
    shutil.copy(shards / entry["path"], outside)
    if leave == "absolute":
        entry["path"] = str(outside)
    elif leave == "dotdot":
        entry["path"] = "../outside/secret.arrow"
    else:
        (shards / "train" / "link.arrow").symlink_to(outside)
        entry["path"] = "train/link.arrow"
    manifest.write(shards, data)
    expected = (
        f"{shards / manifest.MANIFEST}: shard path {entry['path']!r} leads outside the shard directory; "
        "a manifest names its shards relative to it (as `alum shard` writes them)"
    )
    assert open_error(shards) == expected
    with pytest.raises(UserError) as error:
        manifest.verify(shards)
    assert str(error.value) == expected
