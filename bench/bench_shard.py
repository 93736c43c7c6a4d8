"""Benchmark `alum shard` at its defaults against the tokenizer's own raw batch encoding, and
peak memory vs corpus size.

Throughput: the end-to-end `alum shard` run at the defaults a user gets (every core, 64 MiB
pieces; process start, reading, tokenizing, packing, writing and checksumming the shards)
against the tokenizer's raw batch encoding of the same documents already in memory, with
the same number of cores: `SentencePieceProcessor.encode(docs, num_threads=N)` for an `alum
tokenizer` (sentencepiece BPE) and `Tokenizer.encode_batch` of the `tokenizers` library on N
Rayon threads for a Hugging Face one (byte-level BPE). Each on a corpus that is one ~40 MB
file and on the same text as a directory of ~40 KB files. Both are measured in each round,
alternating, and the ratio of each round is reported (this machine is shared and noisy;
absolute numbers drift, ratios much less).

Memory: peak resident memory of the whole process tree (main process plus workers,
sampled every 20 ms) of `alum shard` and `alum tokenizer` on a corpus and on one ten
times larger.

    python bench/bench_shard.py                # 40 MB throughput, 20 MB vs 200 MB memory
    python bench/bench_shard.py --rounds 5 --no-memory
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import sentencepiece as spm
from data_dir import wikitext_train

REPO = Path(__file__).resolve().parents[1]


def single_file_corpus(directory: Path, megabytes: float) -> list[Path]:
    """One file of WikiText-2 train (10.8 MB) repeated until it reaches `megabytes`."""
    directory.mkdir(parents=True, exist_ok=True)
    text = wikitext_train().read_bytes()
    path = directory / "corpus.txt"
    with open(path, "wb") as f:
        for _ in range(max(1, round(megabytes * 1e6 / len(text)))):
            f.write(text)
    return [path]


def many_files_corpus(directory: Path, megabytes: float, file_kb: int = 40) -> list[Path]:
    """The same text as a directory of small files (about `file_kb` KB each, whole lines)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = wikitext_train().read_bytes().splitlines(keepends=True)
    copies = max(1, round(megabytes * 1e6 / wikitext_train().stat().st_size))
    chunk, size, n = [], 0, 0
    for line in lines * copies:
        chunk.append(line)
        size += len(line)
        if size >= file_kb * 1000:
            (directory / f"part-{n:05d}.txt").write_bytes(b"".join(chunk))
            chunk, size, n = [], 0, n + 1
    if chunk:
        (directory / f"part-{n:05d}.txt").write_bytes(b"".join(chunk))
    return [directory]


def build_corpus(directory: Path, megabytes: float) -> list[Path]:
    """Copies of WikiText-2 train (10.8 MB each) until the corpus reaches `megabytes` (memory runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = max(1, round(megabytes * 1e6 / wikitext_train().stat().st_size))
    files = []
    for i in range(copies):
        path = directory / f"part-{i:03d}.txt"
        shutil.copyfile(wikitext_train(), path)
        files.append(path)
    return files


def alum(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(seconds, peak MiB of the summed RSS of the process and its children)."""
    started = time.perf_counter()
    process = psutil.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                tree = [process] + process.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()}")
    return time.perf_counter() - started, peak / 2**20


def documents(inputs: list[Path]) -> list[str]:
    files = [f for p in inputs for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    return [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def raw_encoder(tokenizer: Path, cores: int):
    """The tokenizer's own batch encoding on `cores` threads, the baseline: sentencepiece's
    encode(num_threads), or the `tokenizers` library's encode_batch (Rayon, RAYON_NUM_THREADS)."""
    if (tokenizer / "spm.model").is_file():
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "spm.model"))
        return lambda docs: sum(map(len, sp.encode(docs, num_threads=cores)))
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    return lambda docs: sum(len(e.ids) for e in hf.encode_batch(docs, add_special_tokens=False))


def throughput(work: Path, inputs: list[Path], tokenizer: Path, cores: int, rounds: int) -> list[float]:
    """Ratios of `alum shard` at its defaults (every core, 64 MiB pieces) to raw encoding."""
    docs = documents(inputs)
    encode = raw_encoder(tokenizer, cores)
    ratios = []
    for r in range(rounds):
        started = time.perf_counter()
        tokens = encode(docs)
        raw = tokens / (time.perf_counter() - started)
        out = work / f"shards-{r}"
        started = time.perf_counter()
        subprocess.run(
            alum("shard", "--input", *inputs, "--tokenizer", tokenizer, "--seq-len", 512, "--out", out),
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        shard = tokens / (time.perf_counter() - started)
        shutil.rmtree(out)
        ratios.append(shard / raw)
        print(
            f"  round {r + 1}: raw {raw:,.0f} tok/s | alum shard {shard:,.0f} tok/s | ratio {shard / raw:.2f}",
            flush=True,
        )
    return ratios


def memory(work: Path, tokenizer: Path, small_mb: float, cores: int) -> None:
    print(f"\npeak memory (process tree RSS), {small_mb:.0f} MB vs {10 * small_mb:.0f} MB corpus")
    for megabytes in (small_mb, 10 * small_mb):
        files = build_corpus(work / f"corpus-{megabytes:.0f}mb", megabytes)
        mb = sum(f.stat().st_size for f in files) / 1e6
        seconds, shard_peak = peak_rss(
            alum(
                "shard",
                "--input",
                *files,
                "--tokenizer",
                tokenizer,
                "--seq-len",
                512,
                "--out",
                work / f"mem-shards-{megabytes:.0f}",
            )
        )
        tok_seconds, tok_peak = peak_rss(
            alum(
                "tokenizer",
                "--input",
                *files,
                "--vocab-size",
                8000,
                "--sample-lines",
                20000,
                "--out",
                work / f"mem-tok-{megabytes:.0f}",
                "--threads",
                cores,
            )
        )
        print(
            f"  corpus {mb:6.1f} MB: alum shard {shard_peak:6.0f} MiB ({seconds:5.1f} s) | alum tokenizer "
            f"{tok_peak:6.0f} MiB ({tok_seconds:5.1f} s)"
        )
        shutil.rmtree(work / f"corpus-{megabytes:.0f}mb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size for the throughput rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))  # what `alum shard --workers` defaults to
    os.environ["RAYON_NUM_THREADS"] = str(cores)  # before the `tokenizers` thread pool starts

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        work = Path(tmp)
        corpora = {
            "one file": single_file_corpus(work / "single", args.mb),
            "many small files": many_files_corpus(work / "many", args.mb),
        }
        tokenizers = {}
        for kind in ("bpe", "byte-level-bpe"):
            tokenizers[kind] = work / f"tokenizer-{kind}"
            subprocess.run(
                alum(
                    "tokenizer",
                    "--input",
                    wikitext_train(),
                    "--vocab-size",
                    8000,
                    "--kind",
                    kind,
                    "--out",
                    tokenizers[kind],
                ),
                cwd=REPO,
                check=True,
                capture_output=True,
            )
        files = sum(1 for _ in (work / "many").iterdir())
        print(
            f"corpus: {args.mb:.0f} MB of WikiText-2 train, as one file and as {files} files; {cores} cores; "
            f"seq_len 512; alum shard at its defaults (--workers {cores}, --piece-mb 64)"
        )
        summary = []
        for kind, tokenizer in tokenizers.items():
            baseline = "SentencePieceProcessor.encode" if kind == "bpe" else "tokenizers encode_batch"
            for name, inputs in corpora.items():
                print(f"{kind} tokenizer ({baseline}), {name}:")
                ratios = throughput(work, inputs, tokenizer, cores, args.rounds)
                summary.append(
                    f"  {kind:15s} {name:17s} median {statistics.median(ratios):.2f} "
                    f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})"
                )
        print(
            "alum shard / raw encoding, target >= 0.90 (the first byte-level-bpe round also resolves the tokenizer "
            "with transformers, ~3.5 s here, which later runs read from ~/.cache/alum):"
        )
        print("\n".join(summary))
        if args.memory:
            memory(work, tokenizers["bpe"], args.mb / 2, cores)


if __name__ == "__main__":
    main()
