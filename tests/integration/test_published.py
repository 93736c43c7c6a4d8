"""Published checkpoints and Hugging Face tokenizers: sharding with them, continual ALUM
pretraining from them, `alum tokenizer --kind`, and their bad inputs.

The RoBERTa and BERT directories are stand-ins made in the test (tests/support/published.py) with
the layout of the published ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpoint_logits, ok, pretrain, read_metrics, run_alum, shard_rows, tree_digest
from published import make_bert, make_roberta

from data_prep import manifest
from data_prep.tokenizer_dir import load_tokenizer
from data_prep.work_units import in_validation

SEQ_LEN = 64


@pytest.fixture(scope="session")
def published(tmp_path_factory, wikitext_train) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {
        "roberta": make_roberta(wikitext_train, root / "roberta-base"),
        "bert": make_bert(wikitext_train, root / "bert-base-cased"),
    }


@pytest.fixture(scope="session")
def published_shards(tmp_path_factory, published, wikitext_valid) -> dict[str, Path]:
    """WikiText-2 valid sharded with each published tokenizer, one worker."""
    root = tmp_path_factory.mktemp("published-shards")
    out = {}
    for name, directory in published.items():
        out[name] = root / name
        run_alum(
            "shard",
            "--input",
            wikitext_valid,
            "--tokenizer",
            directory,
            "--seq-len",
            SEQ_LEN,
            "--out",
            out[name],
            "--val-fraction",
            "0.1",
            "--workers",
            "1",
            check=True,
        )
    return out


def documents(text_file: Path) -> list[str]:
    return [d for d in (line.strip() for line in text_file.read_text(encoding="utf-8").splitlines()) if d]


@pytest.mark.parametrize("name", ["roberta", "bert"])
def test_rows_use_the_tokenizers_framing_and_decode_to_the_documents(name, published, published_shards, wikitext_valid):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(published[name]))
    data = manifest.read(published_shards[name])
    info = load_tokenizer(published[name])
    assert data["tokenizer"] == {
        "sha256": info.sha256,
        "kind": "hf",
        "vocab_size": len(tokenizer),
        "style": type(tokenizer).__name__,
    }
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert data["special_token_ids"] == {
        "pad": pad,
        "unk": tokenizer.unk_token_id,
        "cls": cls,
        "sep": sep,
        "mask": tokenizer.mask_token_id,
    }
    assert (name, cls, sep) in (
        ("roberta", tokenizer.convert_tokens_to_ids("<s>"), tokenizer.convert_tokens_to_ids("</s>")),
        ("bert", tokenizer.convert_tokens_to_ids("[CLS]"), tokenizer.convert_tokens_to_ids("[SEP]")),
    )
    docs = documents(wikitext_valid)
    for split in ("train", "val"):
        table = shard_rows(published_shards[name], split)
        assert (table[:, 0] == cls).all()
        bodies = [row[1:][row[1:] != pad] for row in table]
        assert all(body[-1] == sep for body in bodies)
        stream = np.concatenate([body[:-1] for body in bodies])
        parts = np.split(stream[:-1], np.flatnonzero(stream[:-1] == sep) + 1)
        decoded = [tokenizer.decode(part[part != sep].tolist()) for part in parts]
        expected = [d for d in docs if (split == "val") == in_validation(d, 0.1)]
        if name == "roberta":
            assert decoded == expected  # byte-level BPE is lossless
        else:
            assert decoded == [tokenizer.decode(tokenizer.encode(d, add_special_tokens=False)) for d in expected]


@pytest.mark.parametrize("name", ["roberta", "bert"])
def test_hf_tokenizer_shards_do_not_depend_on_the_worker_count(
    name, tmp_path, published, published_shards, wikitext_valid
):
    out, single = tmp_path / "two-workers", tmp_path / "one-worker"
    for directory, workers in ((out, "2"), (single, "1")):
        run_alum(
            "shard",
            *("--input", wikitext_valid, "--tokenizer", published[name], "--seq-len", SEQ_LEN, "--out", directory),
            *("--val-fraction", "0.1", "--workers", workers, "--piece-mb", "0.5"),
            check=True,
        )
    assert tree_digest(out) == tree_digest(single)
    assert len(manifest.read(out)["splits"]["train"]["shards"]) > 1


def test_a_cached_resolution_equals_a_fresh_one(tmp_path, published, monkeypatch):
    for directory in published.values():
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / directory.name))
        fresh = load_tokenizer(directory)
        assert len(list((tmp_path / directory.name / "alum" / "tokenizers").glob("*.json"))) == 1
        assert load_tokenizer(directory) == fresh


def test_special_token_strings_in_the_corpus_stay_text(tmp_path, published):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a <mask> and a </s> in the text\n")
    info = load_tokenizer(published["roberta"])
    run_alum(
        "shard",
        "--input",
        corpus,
        "--tokenizer",
        published["roberta"],
        "--seq-len",
        SEQ_LEN,
        "--out",
        tmp_path / "s",
        check=True,
    )
    ids = shard_rows(tmp_path / "s")[0]
    special = set(info.special_token_ids.values())
    content = ids[1:][ids[1:] != info.special_token_ids["pad"]][:-2]  # before the document's and the row's separator
    assert len(content) > 5 and not special & set(content.tolist())


def test_a_tokenizer_directory_that_is_neither_kind(tmp_path, wikitext_valid):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a tokenizer\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    for directory, message in (
        (notes, f"{notes}: not a tokenizer directory (no spm.model from `alum tokenizer`"),
        (broken, f"{broken}: not a tokenizer directory transformers can load"),
    ):
        result = run_alum(
            "shard",
            "--input",
            wikitext_valid,
            "--tokenizer",
            directory,
            "--seq-len",
            SEQ_LEN,
            "--out",
            tmp_path / "out",
        )
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
        assert not (tmp_path / "out").exists()


def test_a_slow_only_tokenizer_is_refused(tmp_path, wikitext_valid):
    slow = tmp_path / "byt5"
    slow.mkdir()
    (slow / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    result = run_alum(
        "shard", "--input", wikitext_valid, "--tokenizer", slow, "--seq-len", SEQ_LEN, "--out", tmp_path / "out"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{slow}: transformers loads only a slow tokenizer (ByT5Tokenizer)" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kind, cls_name, specials",
    [
        ("byte-level-bpe", "RobertaTokenizer", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]),
        ("wordpiece", "BertTokenizer", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
    ],
)
def test_alum_tokenizer_kinds_load_with_autotokenizer_and_shard(kind, cls_name, specials, tmp_path, wikitext_valid):
    from transformers import AutoTokenizer

    outs = [tmp_path / f"{kind}-{i}" for i in (1, 2)]
    for out in outs:
        run_alum(
            "tokenizer", "--input", wikitext_valid, "--vocab-size", "1500", "--kind", kind, "--out", out, check=True
        )
    assert tree_digest(outs[0]) == tree_digest(outs[1])  # deterministic
    tokenizer = AutoTokenizer.from_pretrained(str(outs[0]))
    assert type(tokenizer).__name__ == cls_name and tokenizer.is_fast and len(tokenizer) == 1500
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == specials
    files = {"byte-level-bpe": {"vocab.json", "merges.txt"}, "wordpiece": {"vocab.txt"}}[kind]
    assert files | {"tokenizer.json"} <= {p.name for p in outs[0].iterdir()}
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    encoded = tokenizer(text).input_ids
    assert encoded[0] == tokenizer.cls_token_id and encoded[-1] == tokenizer.sep_token_id
    if kind == "byte-level-bpe":
        assert tokenizer.decode(encoded, skip_special_tokens=True) == text
    shards = tmp_path / "shards"
    run_alum(
        "shard", "--input", wikitext_valid, "--tokenizer", outs[0], "--seq-len", SEQ_LEN, "--out", shards, check=True
    )
    first = shard_rows(shards)[0]
    assert first[0] == tokenizer.cls_token_id
    assert tokenizer.decode(first[1:12].tolist()) == tokenizer.decode(
        tokenizer.encode(documents(wikitext_valid)[0], add_special_tokens=False)[:11]
    )


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("name", ["roberta", "bert"])
def test_continual_alum_from_a_published_checkpoint(name, tmp_path, published, published_shards):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run_dir = tmp_path / "run"
    # The shipped continual config, shortened; data.tokenizer is left to default to model.init_from.
    ok(
        pretrain(
            run_dir,
            published_shards[name],
            None,
            f"model.init_from={published[name]}",
            "train.max_steps=4",
            "adversarial.start_step=2",
            "checkpoint.every_steps=4",
            "train.lr=1e-3",
            world=2,
            stage=2,
            config=f"configs/{name}-base-continual.yaml",
        )
    )
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["train/loss_adv"] == 0 for m in metrics[:2]) and all(m["train/loss_adv"] > 0 for m in metrics[2:])

    # The engine started from the published weights: its logits are the original model's.
    start = checkpoint_logits(run_dir, "start", tmp_path / "start.pt")
    original = AutoModelForMaskedLM.from_pretrained(str(published[name])).eval()
    with torch.no_grad():
        logits = original(input_ids=start["input_ids"], attention_mask=start["attention_mask"]).logits[start["masked"]]
    torch.testing.assert_close(logits, start["logits"], atol=1e-5, rtol=0)

    exported = tmp_path / "exported"
    run_alum("export", "--run-dir", run_dir, "--out", exported, check=True)
    model = AutoModelForMaskedLM.from_pretrained(str(exported))
    assert type(model) is type(original)
    assert not torch.equal(model.get_input_embeddings().weight, original.get_input_embeddings().weight)  # it trained
    source, tokenizer = (
        AutoTokenizer.from_pretrained(str(published[name])),
        AutoTokenizer.from_pretrained(str(exported)),
    )
    text = "Continual pretraining of a published model."
    assert tokenizer(text).input_ids == source(text).input_ids
    assert load_tokenizer(exported).sha256 == load_tokenizer(published[name]).sha256


@pytest.mark.slow
def test_training_refuses_mismatched_published_inputs(tmp_path, published, published_shards):
    def refused(result, fragment: str) -> None:
        lines = [line for line in result.stderr.splitlines() if "pretrain: error:" in line]
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert fragment in lines[0], lines[0]

    roberta, config = published["roberta"], "configs/roberta-base-continual.yaml"
    # Shards made with another Hugging Face tokenizer than the model's.
    refused(
        pretrain(
            tmp_path / "a",
            published_shards["bert"],
            None,
            f"model.init_from={roberta}",
            world=1,
            stage=0,
            config=config,
        ),
        f"{published_shards['bert']}: shards were built with another tokenizer",
    )
    # A model whose vocabulary is smaller than its tokenizer's.
    small = tmp_path / "small-vocab"
    shutil.copytree(roberta, small)
    small_config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**small_config, "vocab_size": 1000}))
    refused(
        pretrain(
            tmp_path / "b",
            published_shards["roberta"],
            roberta,
            f"model.init_from={small}",
            world=1,
            stage=0,
            config=config,
        ),
        f"{small}: model vocab_size 1000 is smaller than the tokenizer's 2000",
    )
    # A checkpoint directory without weights.
    bare = tmp_path / "no-weights"
    shutil.copytree(roberta, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    refused(
        pretrain(
            tmp_path / "c",
            published_shards["roberta"],
            roberta,
            f"model.init_from={bare}",
            world=1,
            stage=0,
            config=config,
        ),
        f"model.init_from: {bare}: no weights (model.safetensors or pytorch_model.bin)",
    )
    assert not any((tmp_path / run).exists() for run in "abc")


@pytest.mark.slow
def test_a_byte_level_bpe_tokenizer_trains_a_model_from_scratch(tmp_path, wikitext_valid):
    tokenizer, shards = tmp_path / "tokenizer", tmp_path / "shards"
    run_alum(
        "tokenizer",
        "--input",
        wikitext_valid,
        "--vocab-size",
        "1500",
        "--kind",
        "byte-level-bpe",
        "--out",
        tokenizer,
        check=True,
    )
    run_alum(
        "shard",
        "--input",
        wikitext_valid,
        "--tokenizer",
        tokenizer,
        "--seq-len",
        SEQ_LEN,
        "--out",
        shards,
        "--val-fraction",
        "0.1",
        check=True,
    )
    ok(pretrain(tmp_path / "run", shards, tokenizer, "train.max_steps=3", world=1, stage=0))
    losses = [m["train/loss_mlm"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 3 and all(np.isfinite(losses)) and abs(losses[0] - np.log(1536)) < 1.0
