"""`alum demo`: the whole pipeline end to end on a corpus this machine already has.

corpus (the Python standard library's docstrings; nothing is downloaded) -> tokenizer ->
shards -> ALUM pretraining of a tiny BERT by 2 DeepSpeed ranks (ZeRO-2; standard MLM
first, then ALUM) -> export to Hugging Face -> what the model learned: its held-out accuracy
beside that of always guessing the commonest token, and its fill-mask guesses on held-out
text. Every stage is skipped when its output exists, and training resumes, so the command
can be re-run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_prep import manifest
from data_prep.corpus import ReadOptions
from data_prep.docstring_corpus import write_corpus
from data_prep.errors import UserError
from data_prep.inputs import expand_inputs
from data_prep.shard import ShardSettings, shard_corpus
from data_prep.tokenizer import train_tokenizer
from pipeline.tasks.fill_mask import fill_mask_examples, format_examples
from pipeline.train.distributed import free_port
from pipeline.train.metrics import METRICS

CORPUS_BYTES = 4 << 20
VOCAB_SIZE = 4000
SEQ_LEN = 128
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def run_demo(out: str | Path, workers: int = 2, ranks: int = 2) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus" / "stdlib-docstrings.jsonl"
    if not corpus.exists():
        corpus.parent.mkdir(exist_ok=True)
        info = write_corpus(corpus, CORPUS_BYTES)
        print(f"[1/6] corpus: {info['documents']:,} docstrings, {info['bytes'] / 1e6:.1f} MB -> {corpus}", flush=True)
    tokenizer = out / "tokenizer"
    if not tokenizer.exists():
        info = train_tokenizer(
            expand_inputs([str(corpus)]), ReadOptions(), tokenizer, vocab_size=VOCAB_SIZE, threads=workers
        )
        print(
            f"[2/6] tokenizer: {info['vocab_size']:,} pieces from {info['lines_sampled']:,} lines -> {tokenizer}",
            flush=True,
        )
    shards = out / "shards"
    shard_corpus(
        [str(corpus)],
        tokenizer,
        shards,
        settings=ShardSettings(seq_len=SEQ_LEN, val_fraction=0.02, piece_bytes=1 << 20),
        workers=workers,
    )
    checked = manifest.verify(shards)
    print(
        f"[3/6] shards: {checked['num_sequences']:,} sequences of {SEQ_LEN} tokens, {checked['shards']} verified "
        f"shards -> {shards}",
        flush=True,
    )

    run_dir = out / "run"
    print(f"[4/6] pretraining with {ranks} DeepSpeed ranks (ZeRO-2): standard MLM, then ALUM -> {run_dir}", flush=True)
    _pretrain(run_dir, shards, tokenizer, ranks)

    from transformers.utils import logging as hf_logging

    from pipeline.tasks.export import export

    hf_logging.disable_progress_bar()  # the demo's stage lines say what happens
    hf_dir = out / "hf-model"
    export(run_dir, hf_dir, overwrite=True)
    print(f"[5/6] exported -> {hf_dir}", flush=True)
    print("[6/6] what the model learned, on held-out text:", flush=True)
    print(f"      {_accuracy_line(run_dir)}")
    print("      fill-mask, its top 3 guesses for the masked word [the word]:")
    examples = fill_mask_examples(hf_dir, shards)
    for line in format_examples(examples):
        print(f"        {line}", flush=True)
    if len({frozenset(e.guesses) for e in examples}) == 1:
        print(
            "      the same guesses for every word: in a few CPU minutes this tiny model learns where word boundaries\n"
            "      and punctuation go (hence its accuracy above the baseline), not yet which words (README, Quick "
            "start)"
        )
    summary = {
        "metrics": str(run_dir / "metrics.jsonl"),
        "wandb offline run": str(next(iter(sorted((run_dir / "wandb").glob("offline-run-*"))), run_dir / "wandb")),
        "exported model": str(hf_dir),
    }
    print("demo done")
    for key, value in summary.items():
        print(f"  {key:<18} {value}")
    print(f"  load it with: AutoModelForMaskedLM.from_pretrained({str(hf_dir)!r})")
    return summary


def _accuracy_line(run_dir: Path) -> str:
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval/accuracy" in r]
    first, last = evals[0], evals[-1]
    return (
        f"masked-token accuracy {first['eval/accuracy']:.3f} at step {first['step']} -> {last['eval/accuracy']:.3f} "
        f"at step {last['step']}; always guessing the commonest token: {last['eval/commonest_token_accuracy']:.3f}"
    )


def _pretrain(run_dir: Path, shards: Path, tokenizer: Path, ranks: int) -> None:
    """Start training the way users do, with the DeepSpeed launcher, and stream its log lines."""
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "pipeline.pretrain",
        "--config",
        str(CONFIG),
        "--run-dir",
        str(run_dir),
        f"data.shards={shards}",
        f"data.tokenizer={tokenizer}",
    ]
    env = {
        **os.environ,
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join([str(CONFIG.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        command, cwd=CONFIG.parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(("step ", "resumed", "pretrain:", str(run_dir))):
            print("      " + line.rstrip(), flush=True)
    if process.wait() != 0:
        tail = "".join(lines[-20:])
        raise UserError(f"pretraining failed (exit {process.returncode}); its last lines:\n{tail}")
