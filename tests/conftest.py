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
