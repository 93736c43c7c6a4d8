"""The `alum` command: one entry point for every stage of the pipeline.

Subcommands import their modules lazily so `alum --help` and the data-preparation commands
start quickly (no torch import). A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from data_prep.cores import usable_cores
from data_prep.errors import UserError
from pipeline.core.help_format import DefaultsHelpFormatter

OVERWRITE_HELP = "replace --out if {command} wrote it (its marker says so) and it holds nothing else"


def _add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    p.add_argument("--text-field", default="text", help="JSON lines field / Parquet or Arrow column holding the text")
    p.add_argument(
        "--txt-docs",
        choices=["line", "blank"],
        default="line",
        help="text files: a document per line, or blank-line separated",
    )
    p.add_argument(
        "--utf8-errors",
        choices=["replace", "fail"],
        default="replace",
        help="invalid UTF-8: replace with U+FFFD and count, or stop",
    )


def _read_options(args):
    from data_prep.corpus import ReadOptions

    return ReadOptions(text_field=args.text_field, txt_docs=args.txt_docs, utf8_errors=args.utf8_errors)


def _print_summary(title: str, summary: dict) -> None:
    print(title)
    width = max(map(len, summary))
    for key, value in summary.items():
        shown = _shown(key, value)
        print(f"  {key:<{width}}  {shown}")


def _shown(key: str, value) -> str:
    """Counts and rates whole, with thousands separators; seconds to 0.01; fractions to 0.0001."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("fraction"):
        return f"{value:.4f}"
    return f"{value:,.2f}" if key == "seconds" else f"{value:,.0f}"


def cmd_tokenizer(args) -> None:
    from data_prep.inputs import expand_inputs
    from data_prep.tokenizer import train_tokenizer

    summary = train_tokenizer(
        expand_inputs(args.input),
        _read_options(args),
        args.out,
        vocab_size=args.vocab_size,
        kind=args.kind,
        style=args.style,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
        seed=args.seed,
        threads=args.threads,
        sample_lines=args.sample_lines,
        overwrite=args.overwrite,
    )
    _print_summary("tokenizer written", summary)


def cmd_shard(args) -> None:
    from data_prep.shard import ShardSettings, shard_corpus

    settings = ShardSettings(
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        piece_bytes=int(args.piece_mb * (1 << 20)),
        read=_read_options(args),
    )
    summary = shard_corpus(
        args.input,
        args.tokenizer,
        args.out,
        settings=settings,
        workers=args.workers,
        num_nodes=args.num_nodes,
        node_rank=args.node_rank,
        overwrite=args.overwrite,
    )
    if summary.get("already_complete"):
        print(f"{args.out}: already complete with these settings; nothing to do")
        return
    tokens = summary["tokens"]
    # Two counts that differ by the framing: the documents' own tokens, and the rows'
    # non-padding tokens ([CLS], [SEP] and separators included), which `alum verify` reports.
    summary["tokens (documents)"] = summary.pop("tokens")
    if "manifest" in summary:
        from data_prep.manifest import read

        summary["tokens (rows, with [CLS]/[SEP] framing)"] = read(args.out)["num_tokens"]
    summary["padding_fraction"] = summary.pop("padding_tokens") / max(1, summary["sequences"] * args.seq_len)
    summary["tokens_per_s"] = tokens / max(summary["seconds"], 1e-9)
    _print_summary("shards written" if "manifest" in summary else "this node's shards written", summary)


def cmd_verify(args) -> None:
    from data_prep.manifest import verify

    result = verify(args.dir)
    result["tokens (rows, with [CLS]/[SEP] framing)"] = result.pop("num_tokens")
    _print_summary(f"{args.dir}: OK", result)


def cmd_merge(args) -> None:
    from data_prep.shard import finalize

    print(f"manifest written: {finalize(args.dir)}")


def cmd_export(args) -> None:
    from pipeline.tasks.export import export

    print(f"exported: {export(args.run_dir, args.out, tag=args.tag, overwrite=args.overwrite)}")


def cmd_demo(args) -> None:
    from pipeline.tasks.demo import run_demo

    run_demo(args.out, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alum", description="ALUM adversarial pretraining pipeline", formatter_class=DefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "tokenizer",
        formatter_class=DefaultsHelpFormatter,
        help="train a tokenizer (sentencepiece BPE, byte-level BPE or WordPiece) on a corpus sample",
    )
    _add_read_options(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="tokenizer directory to create")
    p.add_argument(
        "--kind",
        choices=["bpe", "byte-level-bpe", "wordpiece"],
        default="bpe",
        help="bpe: sentencepiece BPE; byte-level-bpe: RoBERTa/GPT-2 style; wordpiece: BERT style",
    )
    p.add_argument(
        "--style",
        choices=["bert", "roberta"],
        default=None,
        help="special tokens: [CLS]/[SEP]/... or <s>/</s>/... (default: roberta for byte-level-bpe, else bert)",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995, help="--kind bpe only")
    p.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="--kind bpe only: map unknown characters to [UNK] instead of bytes (default: bytes)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling and training seed")
    p.add_argument("--threads", type=int, default=None, help="sentencepiece training threads (default: all cores)")
    p.add_argument(
        "--sample-lines", type=int, default=1_000_000, help="lines in the seeded training sample (bounds memory)"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(command="alum tokenizer"))
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser(
        "shard", formatter_class=DefaultsHelpFormatter, help="tokenize and pack a corpus into Arrow shards"
    )
    _add_read_options(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        help="a directory written by `alum tokenizer`, or any Hugging Face (fast) tokenizer or model directory",
    )
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help=f"tokenizer processes (default: every core, {usable_cores()} here; output does not depend on it)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="share of documents (by content hash) in the val split that training validates on",
    )
    p.add_argument(
        "--piece-mb",
        type=float,
        default=64.0,
        help="input MiB per shard file (and per unit of resume and of --num-nodes)",
    )
    p.add_argument("--num-nodes", type=int, default=1, help="machines sharing the work")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank in [0, num-nodes)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(command="alum shard"))
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser(
        "verify", formatter_class=DefaultsHelpFormatter, help="check a shard directory's schema, counts and checksums"
    )
    p.add_argument("dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "merge",
        formatter_class=DefaultsHelpFormatter,
        help="write the manifest once every node's shards are in one directory",
    )
    p.add_argument("dir")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "export",
        formatter_class=DefaultsHelpFormatter,
        help="turn a checkpoint (any ZeRO stage) into a Hugging Face model directory",
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(command="alum export"))
    p.set_defaults(func=cmd_export)

    # Listed for `alum --help`; `main` hands these commands' arguments to their modules unparsed.
    for name, (module, text) in PASSED_THROUGH.items():
        sub.add_parser(name, formatter_class=DefaultsHelpFormatter, help=f"{text} (same as python -m {module} --help)")

    p = sub.add_parser(
        "demo",
        formatter_class=DefaultsHelpFormatter,
        help="the whole pipeline on a corpus built from Python's docstrings",
    )
    p.add_argument("--out", default="runs/demo", help="where the demo writes corpus, tokenizer, shards, run and export")
    p.add_argument("--workers", type=int, default=2, help="sharding processes and CPU training ranks")
    p.set_defaults(func=cmd_demo)
    return parser


# Commands whose module parses its own arguments: `alum NAME ARGS` is `python -m MODULE ARGS`.
PASSED_THROUGH = {
    "pretrain": ("pipeline.pretrain", "train in this process"),
    "supervise": (
        "pipeline.supervise",
        "run a launch command: stop it cleanly on SIGTERM/SIGUSR1, relaunch it after a failure",
    ),
    "eval": (
        "pipeline.tasks.mlm_eval",
        "MLM loss, perplexity, accuracy and robustness of an HF model on a shard split",
    ),
    "finetune": (
        "pipeline.finetune",
        "fine-tune a BERT/RoBERTa classifier (SST-2, RTE, your own data), standard or ALUM",
    ),
    "plot": ("pipeline.tasks.plot", "loss components, mask rate, learning rate and eval perplexity of runs, as a PNG"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASSED_THROUGH:
        module = importlib.import_module(PASSED_THROUGH[argv[0]][0])
        return module.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"alum {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alum {args.command}: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
