"""Shared fixtures: the real test data (the directory ALUM_SHARED_DATA names), a tokenizer
trained on it once per session, and the reference runs others are compared with. The plain
helpers they use are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import RUN, SmallDisk, build_shards, build_tokenizer, data_file, ok, pretrain


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory) -> Path:
    """A cache directory of the session's own (resolved tokenizers), for every process it starts."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def wikitext_train() -> Path:
    return data_file("wikitext-2/train.txt")


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return data_file("wikitext-2/valid.txt")


@pytest.fixture(scope="session")
def bert_tokenizer(tmp_path_factory, wikitext_train) -> Path:
    """A BERT-style BPE tokenizer trained on WikiText-2 train (shared by the data tests)."""
    return build_tokenizer(wikitext_train, tmp_path_factory.mktemp("tokenizers") / "bert")


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, wikitext_valid, bert_tokenizer) -> Path:
    """WikiText-2 valid packed into 64-token rows, 10% of documents in the val split."""
    return build_shards(wikitext_valid, bert_tokenizer, tmp_path_factory.mktemp("train-shards") / "shards")


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory, bert_tokenizer) -> Path:
    """Tiny Shakespeare's first 6,000 lines (a line a document), sharded as train_shards: a second corpus."""
    root = tmp_path_factory.mktemp("shakespeare")
    text = root / "shakespeare.txt"
    text.write_text("".join(data_file("tinyshakespeare/input.txt").read_text().splitlines(keepends=True)[:6000]))
    return build_shards(text, bert_tokenizer, root / "shards")


@pytest.fixture(scope="session")
def sst2_shards(tmp_path_factory, bert_tokenizer) -> Path:
    """SST-2 dev sentences (a sentence a document), sharded as train_shards: a small third corpus."""
    root = tmp_path_factory.mktemp("sst2")
    text = root / "sst2.txt"
    lines = data_file("sst2/dev.tsv").read_text().splitlines()[1:]
    text.write_text("".join(line.split("\t")[0] + "\n" for line in lines))
    return build_shards(text, bert_tokenizer, root / "shards")


@pytest.fixture(scope="session", params=[2, 3], ids=["zero2", "zero3"])
def reference(request, tmp_path_factory, train_shards, bert_tokenizer) -> tuple[int, Path]:
    """An 8-step, 2-rank ALUM run (standard MLM for 4 steps) per ZeRO stage: what other runs must reproduce."""
    stage = request.param
    run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "run"
    ok(pretrain(run_dir, train_shards, bert_tokenizer, *RUN, stage=stage))
    return stage, run_dir


@pytest.fixture
def small_disk(tmp_path) -> SmallDisk:
    """A tmpfs to mount at the size a test needs (`helpers.SmallDisk`), always unmounted after."""
    disk = SmallDisk(tmp_path / "small-disk")
    yield disk
    disk.unmount()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, bert_tokenizer) -> Path:
    """A 64-wide, 2-layer BERT (random weights) saved with the project's tokenizer files: the layout
    `alum export` writes (fine-tuning and HF Trainer tests)."""
    import shutil

    import torch
    from transformers import BertConfig, BertForMaskedLM

    from data_prep.tokenizer_dir import load_tokenizer

    tokenizer = load_tokenizer(bert_tokenizer)
    ids = tokenizer.special_token_ids
    config = BertConfig(
        vocab_size=-(-tokenizer.vocab_size // 64) * 64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=256,
        pad_token_id=ids["pad"],
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "hf"
    BertForMaskedLM(config).save_pretrained(out)
    for path in Path(bert_tokenizer).iterdir():
        shutil.copy(path, out / path.name)
    return out


def mixture_overrides(wiki: Path, shakespeare: Path, sst2: Path) -> tuple[str, ...]:
    """Two corpora mixed 3:1 (WikiText-2 is the larger), SST-2 validated on but not trained on."""
    return (
        "data.shards=''",  # pretrain_args gives data.shards: a mixture replaces it
        f"data.sources=[{{name: wiki, shards: {wiki}, weight: 3}}, {{name: shakespeare, shards: {shakespeare}}}]",
        f"eval.sets=[{{name: sst2, shards: {sst2}}}]",
    )


@pytest.fixture(scope="session")
def mixture_reference(tmp_path_factory, train_shards, shakespeare_shards, sst2_shards, bert_tokenizer):
    """RUN on a two-corpus mixture, 2 ranks, ZeRO-2: what the mixture's resumed runs must reproduce.
    Returns (its run directory, its overrides)."""
    run_dir = tmp_path_factory.mktemp("mixture") / "run"
    overrides = (*RUN, *mixture_overrides(train_shards, shakespeare_shards, sst2_shards))
    ok(pretrain(run_dir, train_shards, bert_tokenizer, *overrides))
    return run_dir, overrides
