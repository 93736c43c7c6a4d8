"""`alum demo`: the pipeline end to end on a corpus this machine already has.

Builds a JSON lines corpus from the Python standard library's docstrings, trains a
tokenizer on it, shards it, verifies the shards and prints where everything is. Every stage
is skipped when its output already exists, so the command can be re-run.
"""

from __future__ import annotations

from pathlib import Path

from data_prep import manifest
from data_prep.corpus import ReadOptions, expand_inputs
from data_prep.docstring_corpus import write_corpus
from data_prep.shard import ShardSettings, shard_corpus
from data_prep.tokenizer import train_tokenizer

CORPUS_BYTES = 4 << 20
VOCAB_SIZE = 4000
SEQ_LEN = 128


def run_demo(out: str | Path, workers: int = 2) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus" / "stdlib-docstrings.jsonl"
    if not corpus.exists():
        corpus.parent.mkdir(exist_ok=True)
        info = write_corpus(corpus, CORPUS_BYTES)
        print(f"[1/4] corpus: {info['documents']:,} docstrings, {info['bytes'] / 1e6:.1f} MB -> {corpus}")
    tokenizer = out / "tokenizer"
    if not tokenizer.exists():
        info = train_tokenizer(expand_inputs([str(corpus)]), ReadOptions(), tokenizer, vocab_size=VOCAB_SIZE, threads=workers)
        print(f"[2/4] tokenizer: {info['vocab_size']:,} pieces from {info['lines_sampled']:,} lines -> {tokenizer}")
    shards = out / "shards"
    settings = ShardSettings(seq_len=SEQ_LEN, val_fraction=0.02, piece_bytes=1 << 20)
    info = shard_corpus([str(corpus)], tokenizer, shards, settings, workers=workers)
    print(f"[3/4] shards: {shards}")
    checked = manifest.verify(shards)
    data = manifest.read(shards)
    print(f"[4/4] verified {checked['shards']} shards")
    summary = {
        "documents": data["stats"]["documents"],
        "tokens": data["stats"]["tokens"],
        "sequences": {name: split["num_sequences"] for name, split in data["splits"].items()},
        "padding_fraction": round(data["stats"]["padding_tokens"] / max(1, data["num_sequences"] * SEQ_LEN), 4),
        "shard_seconds": round(info.get("seconds", 0.0), 2),
        "tokenizer": str(tokenizer),
        "shards": str(shards),
    }
    print("demo summary")
    for key, value in summary.items():
        print(f"  {key:<16} {value}")
    return summary
