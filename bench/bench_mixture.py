"""Benchmark the mixture's sample order against the single-source one, and against a step.

The sampler is the only per-batch work a mixture adds (rows and masking cost the same per
sample whichever source a row comes from). Measured per global batch, at the default batch
sizes of configs/tiny.yaml (32) and configs/bert-base.yaml (256):

- single: `pipeline.data.sampling.global_batch_indices` over one corpus of the mixture's
  summed size, as a `data.shards` run computes its batch;
- mixture: `pipeline.data.mixture.MixtureOrder.samples` over three sources (sizes of a
  large, a medium and a small corpus, the small one repeating), weights 5:3:2.

Consecutive batches from a position well into the run. The mixture builds a table once per
block of 65,536 samples (cached): its build is timed apart, on fresh blocks, and added to the
mixture's per-batch time spread over a block's batches, as a run pays it. The two take
turns within each round; the summary is the median over rounds
of each per-batch time and of their ratio. Then one tiny training step (configs/models/tiny.yaml,
batch 32 x 128 tokens, 15% masked, forward + backward + AdamW step, fp32 on CPU) is timed, and
the sampler's time is given as a share of it.

    python bench/bench_mixture.py                 # writes docs/mixture-bench.{json,md}
    python bench/bench_mixture.py --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_prep import atomic
from pipeline.data.mixture import BLOCK, MixtureOrder
from pipeline.data.sampling import global_batch_indices
from pipeline.model.masked_lm import MaskedLM, build_model, hf_config

REPO = Path(__file__).resolve().parents[1]
SIZES = (300_000_000, 40_000_000, 500_000)  # rows of 128 or 512 tokens: a web crawl, books, a small domain corpus
WEIGHTS = (5.0, 3.0, 2.0)
BATCHES = {"tiny": 32, "bert-base": 256}
START = 10_000_000  # samples already consumed: deep into a run, well past the small source's first epochs


def per_batch(fn, batch: int, count: int, offset: int) -> float:
    """Seconds per call of ``fn(consumed, batch)`` over ``count`` consecutive batches."""
    started = time.perf_counter()
    for i in range(count):
        fn(START + offset + i * batch, batch)
    return (time.perf_counter() - started) / count


def sampler_times(batch: int, rounds: int, count: int) -> dict:
    order, n = MixtureOrder(SIZES, WEIGHTS), sum(SIZES)
    single = lambda consumed, size: global_batch_indices(consumed, size, n, seed=0)  # noqa: E731
    mixture = lambda consumed, size: order.samples(consumed, size, seed=0)  # noqa: E731
    rows = []
    for r in range(rounds):
        offset = r * BLOCK  # each round in a block of its own
        started = time.perf_counter()
        mixture(START + offset, batch)  # builds the block's table
        table = time.perf_counter() - started
        s, m = per_batch(single, batch, count, offset), per_batch(mixture, batch, count, offset)
        m += table * batch / BLOCK  # the table's build, spread over the block's batches
        rows.append({"single_ms": s * 1e3, "mixture_ms": m * 1e3, "table_ms": table * 1e3, "ratio": m / s})
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {"rounds": rows}


def tiny_step_ms(steps: int) -> float:
    """Median time of one tiny training step (the model configs/tiny.yaml trains), in ms."""
    torch.manual_seed(0)
    specials = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    config = hf_config(str(REPO / "configs/models/tiny.yaml"), 2000, specials, 128)
    model = MaskedLM(build_model(config, None, False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(5, 2000, (32, 128))
    masked_index = torch.nonzero(torch.rand(32 * 128) < 0.15).flatten()
    labels = ids.flatten()[masked_index]
    times = []
    for _ in range(steps + 2):  # the first two warm up
        started = time.perf_counter()
        logits, _ = model(ids, None, masked_index)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:]) * 1e3


def markdown(results: dict) -> str:
    step = results["tiny_step_ms"]
    lines = [
        "# Mixture sampler: cost per global batch",
        "",
        "Made by `python bench/bench_mixture.py` ([benchmarks.md](benchmarks.md#the-mixtures-sample-order)); "
        f"{results['machine']}, {results['rounds']} rounds of {results['batches_per_round']} consecutive batches "
        f"from sample {START:,}. Three sources of {', '.join(f'{s:,}' for s in SIZES)} rows, weights "
        f"{':'.join(f'{w:g}' for w in WEIGHTS)}; single: one source of their summed size.",
        "",
        "| batch | single (ms) | mixture (ms) | ratio | share of a tiny step | block table (ms, once a block) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["batches"].items():
        lines.append(
            f"| {name} ({BATCHES[name]}) | {r['single_ms']:.3f} | {r['mixture_ms']:.3f} | {r['ratio']:.1f}x "
            f"| {r['mixture_ms'] / step:.2%} | {r['table_ms']:.1f} |"
        )
    lines += [
        "",
        f"A tiny training step (configs/models/tiny.yaml, 32 x 128 tokens, fp32, CPU) takes {step:.1f} ms; "
        "the bert-base batch is set against the same tiny step, an upper bound on its share (a bert-base step "
        "is far longer).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=200, help="consecutive batches per round and variant")
    parser.add_argument("--steps", type=int, default=10, help="tiny training steps timed")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/mixture-bench.*")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {
        # The load average says how shared the machine was: the step's time suffers more than the ratio.
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "rounds": args.rounds,
        "batches_per_round": args.batches,
        "batches": {name: sampler_times(size, args.rounds, args.batches) for name, size in BATCHES.items()},
        "tiny_step_ms": tiny_step_ms(args.steps),
    }
    text = markdown(results)
    print(text)
    if not args.no_write:
        atomic.write_bytes(REPO / "docs" / "mixture-bench.json", (json.dumps(results, indent=1) + "\n").encode())
        atomic.write_bytes(REPO / "docs" / "mixture-bench.md", text.encode())


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
