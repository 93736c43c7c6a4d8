"""Tokenizer training, the HF directory, and id parity with sentencepiece on real text."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from helpers import data_file, refused_in_one_line, run_alum, tree_digest
from transformers import AutoTokenizer

from data_prep.corpus import ReadOptions
from data_prep.errors import UserError
from data_prep.inputs import expand_inputs
from data_prep.tokenizer import reservoir_sample, train_tokenizer
from data_prep.tokenizer_dir import load_tokenizer


def real_texts() -> list[str]:
    """Raw lines from every shared corpus: English prose, early-modern English, reviews, adversarial NLI."""
    texts = data_file("wikitext-2/valid.txt").read_text(encoding="utf-8").splitlines()[:3000]
    texts += data_file("tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines()[:3000]
    texts += [line.split("\t")[0] for line in data_file("sst2/dev.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    for examples in json.loads(data_file("advglue/dev.json").read_text(encoding="utf-8")).values():
        for example in examples:
            texts += [v for k, v in example.items() if isinstance(v, str) and k != "idx"]
    # Whitespace and Unicode edge cases the normalisers must agree on.
    texts += ["", "two  spaces", "tab\there", "line\nbreak", "ﬁ ligature ① ｆｕｌｌ", "emoji 😀 中文 ü"]
    # Stripped, as `alum shard` strips every document: sentencepiece puts a second "▁"
    # before text that starts with a space, the HF pipeline one (data_prep.tokenizer).
    return [t.strip() for t in texts]


def test_hf_tokenizer_gives_sentencepiece_ids_on_real_text(bert_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(bert_tokenizer / "spm.model"))
    hf = AutoTokenizer.from_pretrained(str(bert_tokenizer))
    texts = real_texts()
    assert len(texts) > 6000
    mismatches = [t for t in texts if hf(t, add_special_tokens=False)["input_ids"] != sp.encode(t)]
    assert mismatches == []
    text = "The quick brown fox jumps over the lazy dog."
    assert hf(text)["input_ids"] == [2] + sp.encode(text) + [3]


def test_bert_special_tokens(bert_tokenizer):
    info = load_tokenizer(bert_tokenizer)
    assert info.special_token_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    hf = AutoTokenizer.from_pretrained(str(bert_tokenizer))
    assert (hf.pad_token, hf.unk_token, hf.cls_token, hf.sep_token, hf.mask_token) == (
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    )
    assert [hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id] == [0, 1, 2, 3, 4]
    sp = spm.SentencePieceProcessor(model_file=str(info.path / "spm.model"))
    assert hf("a [MASK] b", add_special_tokens=False)["input_ids"] == [*sp.encode("a"), 4, *sp.encode("b")]
    # The sentencepiece model never produces a special id from text: a corpus cannot inject [MASK].
    assert 4 not in sp.encode("a [MASK] b")
    assert info.vocab_size == 2000 == len(hf)


@pytest.mark.parametrize(
    "masked, filled",
    [
        ("free [MASK]; you", "free the; you"),  # before punctuation
        ("[MASK] is a", "the is a"),  # at the start
        ("one of [MASK]", "one of the"),  # at the end
        ("one of [MASK].", "one of the."),  # at the end, before punctuation
        ("of [MASK] [MASK] and", "of the the and"),  # two in a row
    ],
)
def test_fill_mask_inputs_read_like_training_data(bert_tokenizer, masked, filled):
    """The mask stands for one training piece ("▁the"): the pieces around it are the ones
    sentencepiece gives the filled-in text."""
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(bert_tokenizer / "spm.model"))
    hf = AutoTokenizer.from_pretrained(str(bert_tokenizer))
    the = sp.piece_to_id("▁the")
    expected = [4 if i == the else i for i in sp.encode(filled)]
    assert expected.count(4) == masked.count("[MASK]")
    assert hf(masked, add_special_tokens=False)["input_ids"] == expected


def test_roberta_style_tokenizer(tmp_path, wikitext_valid):
    out = tmp_path / "roberta"
    train_tokenizer(
        expand_inputs([str(wikitext_valid)]), ReadOptions(), out, vocab_size=1000, style="roberta", threads=2
    )
    info = load_tokenizer(out)
    assert info.special_token_ids == {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": 4}
    hf = AutoTokenizer.from_pretrained(str(out))
    assert (hf.cls_token, hf.sep_token, hf.pad_token, hf.mask_token, hf.bos_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<mask>",
        "<s>",
    )
    sp = spm.SentencePieceProcessor(model_file=str(info.path / "spm.model"))
    # WikiText spells unknown words "<unk>", RoBERTa's unk token: HF maps special-token strings
    # to their ids, sentencepiece never does (documented in data_prep.tokenizer).
    texts = [t for t in real_texts() if not any(special in t for special in hf.all_special_tokens)]
    assert len(texts) > 4000
    assert [t for t in texts if hf(t, add_special_tokens=False)["input_ids"] != sp.encode(t)] == []
    assert hf("one", "two")["input_ids"] == [0, *sp.encode("one"), 2, 2, *sp.encode("two"), 2]


def test_training_is_seeded_and_sample_is_bounded(tmp_path, wikitext_valid):
    files = expand_inputs([str(wikitext_valid)])
    sample_a, _, seen = reservoir_sample(files, ReadOptions(), 500, seed=1)
    sample_b, _, _ = reservoir_sample(files, ReadOptions(), 500, seed=1)
    sample_c, _, _ = reservoir_sample(files, ReadOptions(), 500, seed=2)
    assert len(sample_a) == 500 < seen
    assert sample_a == sample_b != sample_c
    one = train_tokenizer(files, ReadOptions(), tmp_path / "a", vocab_size=800, seed=3, sample_lines=1000, threads=1)
    train_tokenizer(files, ReadOptions(), tmp_path / "b", vocab_size=800, seed=3, sample_lines=1000, threads=1)
    assert one["lines_sampled"] == 1000
    assert load_tokenizer(tmp_path / "a").sha256 == load_tokenizer(tmp_path / "b").sha256


def test_vocabulary_too_large_for_corpus(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a tiny corpus\nwith very few words\n")
    result = run_alum("tokenizer", "--input", corpus, "--vocab-size", "5000", "--out", tmp_path / "tok")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--vocab-size 5000 is too large for this corpus" in result.stderr
    assert not (tmp_path / "tok").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.txt"]


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, wikitext_valid):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists; use --overwrite"):
        train_tokenizer(expand_inputs([str(wikitext_valid)]), ReadOptions(), out, vocab_size=500)
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_its_own_output_and_never_an_input(tmp_path, wikitext_valid):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(wikitext_valid.read_text(encoding="utf-8").splitlines()[:2000]))
    before = tree_digest(corpus)

    def tokenizer(out, *extra):
        return run_alum(
            "tokenizer",
            "--input",
            corpus,
            "--vocab-size",
            "500",
            "--sample-lines",
            "2000",
            "--threads",
            "1",
            "--out",
            out,
            *extra,
        )

    # The input itself, a file in it, a directory holding it: refused before anything is read or deleted.
    refused_in_one_line(tokenizer(corpus, "--overwrite"), f"--out {corpus}: contains the input {corpus / 'a.txt'}")
    refused_in_one_line(
        tokenizer(corpus / "a.txt", "--overwrite"), f"--out {corpus / 'a.txt'}: is the input {corpus / 'a.txt'}"
    )
    refused_in_one_line(tokenizer(tmp_path, "--overwrite"), f"--out {tmp_path}: contains the input")
    assert tree_digest(corpus) == before

    # Its own output: replaced; with a file of the user's in it, or inside it, refused.
    out = tmp_path / "tok"
    assert tokenizer(out).returncode == 0
    assert tokenizer(out, "--overwrite", "--seed", "1").returncode == 0
    assert json.loads((out / ".alum-output.json").read_text())["written_by"] == "alum tokenizer"
    (out / "notes.txt").write_text("mine")
    refused_in_one_line(
        tokenizer(out, "--overwrite"),
        f"{out / 'notes.txt'}: not written by alum tokenizer; --overwrite would delete it",
    )
    refused_in_one_line(
        tokenizer(out / "inner"), f"--out {out / 'inner'}: lies inside {out}, which alum tokenizer wrote"
    )
    assert (out / "notes.txt").read_text() == "mine" and not (out / "inner").exists()


def test_tokenizer_dir_without_model(tmp_path, wikitext_valid):
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    result = run_alum(
        "shard", "--input", wikitext_valid, "--tokenizer", empty, "--seq-len", "64", "--out", tmp_path / "out"
    )
    assert result.returncode == 2
    assert f"{empty}: not a tokenizer directory (no spm.model from `alum tokenizer`" in result.stderr
    assert not (tmp_path / "out").exists()


def test_altered_tokenizer_model_is_detected(tmp_path, bert_tokenizer):
    import shutil

    copy = tmp_path / "tok"
    shutil.copytree(bert_tokenizer, copy)
    model = copy / "spm.model"
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match="does not match alum_tokenizer.json"):
        load_tokenizer(copy)


def test_help_shows_no_boolean_defaults():
    """--no-byte-fallback was shown as "(default: True)": the default of the flag's destination, not of the flag."""
    result = run_alum("tokenizer", "--help")
    assert (
        result.returncode == 0
        and "(default: True)" not in result.stdout
        and "(default: bytes)" in " ".join(result.stdout.split())
    )
