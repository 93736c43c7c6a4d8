"""Benchmark `alum shard` against raw sentencepiece encoding, and peak memory vs corpus size.

Throughput: the end-to-end `alum shard` run (process start, reading, tokenizing, packing,
writing and checksumming the shards) against `SentencePieceProcessor.encode(docs,
num_threads=N)` on the same documents already in memory, with the same number of cores.
Both are measured in each round, alternating, and the ratio of each round is reported
(this machine is shared and noisy; absolute numbers drift, ratios much less).

Memory: peak resident memory of the whole process tree (main process plus workers,
sampled every 20 ms) of `alum shard` and `alum tokenizer` on a corpus and on one ten
times larger.

    python bench/bench_shard.py                # 20 MB throughput, 20 MB vs 200 MB memory
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

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("ALUM_SHARED_DATA", REPO.parent / "shared" / "data")) / "wikitext-2" / "train.txt"


def build_corpus(directory: Path, megabytes: float) -> list[Path]:
    """Copies of WikiText-2 train (10.8 MB each) until the corpus reaches `megabytes`."""
    directory.mkdir(parents=True, exist_ok=True)
    size = SOURCE.stat().st_size
    copies = max(1, round(megabytes * 1e6 / size))
    files = []
    for i in range(copies):
        path = directory / f"part-{i:03d}.txt"
        shutil.copyfile(SOURCE, path)
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


def throughput(work: Path, files: list[Path], tokenizer: Path, cores: int, rounds: int, piece_mb: float) -> list[dict]:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "spm.model"))
    docs = [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    results = []
    for r in range(rounds):
        started = time.perf_counter()
        tokens = sum(map(len, sp.encode(docs, num_threads=cores)))
        raw = tokens / (time.perf_counter() - started)

        out = work / f"shards-{r}"
        started = time.perf_counter()
        subprocess.run(
            alum("shard", "--input", *files, "--tokenizer", tokenizer, "--seq-len", 512, "--out", out,
                 "--workers", cores, "--piece-mb", piece_mb),
            cwd=REPO, check=True, capture_output=True,
        )
        shard = tokens / (time.perf_counter() - started)
        shutil.rmtree(out)
        results.append({"raw_tok_s": raw, "shard_tok_s": shard, "ratio": shard / raw, "tokens": tokens})
        print(f"round {r + 1}: raw encode {raw:,.0f} tok/s | alum shard {shard:,.0f} tok/s | ratio {shard / raw:.2f}", flush=True)
    return results


def memory(work: Path, tokenizer: Path, small_mb: float, cores: int, piece_mb: float) -> None:
    print(f"\npeak memory (process tree RSS), {small_mb:.0f} MB vs {10 * small_mb:.0f} MB corpus")
    for megabytes in (small_mb, 10 * small_mb):
        files = build_corpus(work / f"corpus-{megabytes:.0f}mb", megabytes)
        mb = sum(f.stat().st_size for f in files) / 1e6
        seconds, shard_peak = peak_rss(alum("shard", "--input", *files, "--tokenizer", tokenizer, "--seq-len", 512,
                                            "--out", work / f"mem-shards-{megabytes:.0f}", "--workers", cores, "--piece-mb", piece_mb))
        tok_seconds, tok_peak = peak_rss(alum("tokenizer", "--input", *files, "--vocab-size", 8000, "--sample-lines", 20000,
                                              "--out", work / f"mem-tok-{megabytes:.0f}", "--threads", cores))
        print(f"  corpus {mb:6.1f} MB: alum shard {shard_peak:6.0f} MiB ({seconds:5.1f} s) | alum tokenizer {tok_peak:6.0f} MiB ({tok_seconds:5.1f} s)")
        shutil.rmtree(work / f"corpus-{megabytes:.0f}mb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size for the throughput rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--piece-mb", type=float, default=4.0)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        work = Path(tmp)
        files = build_corpus(work / "corpus", args.mb)
        tokenizer = work / "tokenizer"
        subprocess.run(alum("tokenizer", "--input", files[0], "--vocab-size", 8000, "--out", tokenizer), cwd=REPO, check=True, capture_output=True)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"corpus: {len(files)} x WikiText-2 train = {mb:.1f} MB; {args.cores} cores; seq_len 512; piece {args.piece_mb} MiB")
        results = throughput(work, files, tokenizer, args.cores, args.rounds, args.piece_mb)
        ratios = [r["ratio"] for r in results]
        print(f"median ratio alum shard / raw encode: {statistics.median(ratios):.2f} (target >= 0.90; rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        if args.memory:
            memory(work, tokenizer, args.mb, args.cores, args.piece_mb)


if __name__ == "__main__":
    main()
