"""`alum finetune`'s command line: its options (defaults and help), and the checks of their values
that need no file (ranges, combinations), each refused in one line that names the option.
"""

from __future__ import annotations

import argparse
import math

from data_prep.errors import UserError
from pipeline.methods.registry import FINETUNE_NAMES


def check_options(args: argparse.Namespace) -> None:
    """Refuse a value out of range before anything is loaded."""
    for name in ("lr", "batch_size", "epochs", "max_length", "eval_every"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    for name in ("max_steps", "train_subset"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}: must not be negative, got {getattr(args, name)}")
    if not (math.isfinite(args.alpha) and args.alpha >= 0):
        raise UserError(f"--alpha: must be a finite number >= 0, got {args.alpha}")
    if args.precision not in ("auto", "fp32") and not args.deepspeed:
        raise UserError(f"--precision {args.precision}: needs --deepspeed (a run without it trains in fp32)")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct integers, got {text!r}")
    return seeds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="an exported (alum export) or HF BERT/RoBERTa directory")
    p.add_argument("--task", required=True, help="sst2, rte, or a directory with train/dev .jsonl or .tsv")
    p.add_argument("--data", help="for sst2/rte: the GLUE task directory (train.tsv, dev.tsv)")
    p.add_argument("--advglue", help="AdvGLUE dev.json: also report accuracy on the task's adversarial subset")
    p.add_argument(
        "--train-subset",
        type=int,
        default=0,
        metavar="N",
        help="train on N training examples (0: all): the first N of a permutation by a fixed seed, not --seeds, "
        "kept in the training set's order, so every seed and model trains on the same N; --epochs counts passes "
        "over them",
    )
    p.add_argument("--out", required=True, help="where seed-N/ models and results.json go")
    p.add_argument(
        "--method",
        choices=list(FINETUNE_NAMES),
        default="standard",
        help="standard cross-entropy, or an adversarial method (pipeline/methods/adversarial.py) at its defaults",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the ALUM term (the paper fine-tunes with 1)")
    p.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (linear warm-up and decay)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over the ranks")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs decides)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--eval-every", type=int, default=500, help="dev accuracy every N steps (and at the end)")
    p.add_argument(
        "--deepspeed",
        metavar="JSON",
        help="train with DeepSpeed (ZeRO settings from this file, e.g. "
        "configs/deepspeed/zero2.json), one rank per process: deepspeed --num_gpus N --module pipeline.finetune ...",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="with --deepspeed: auto is bf16 where the accelerator supports it, else fp32; "
        "the saved model is fp32 either way",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
