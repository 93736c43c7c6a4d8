"""Benchmark the adversarial methods: each one's training-step time over the standard step's,
measured in one run, beside its measured forward and backward passes through the encoder.

Every method trains a copy of the same small BERT (the project's `MaskedLM`, dropout on, fp32
on CPU, plain PyTorch: the method's `objective` at its defaults, driven by `pipeline.methods.driver.drive`
with a `backward()` per loss it yields, AdamW),
on the same real masked batches of WikiText-2 (`bench/bench_step.py` builds them). Within a
round the methods take turns step by step (the machine is noisy); each round reports the
median step time of each, and the summary is the median over rounds of each ratio. Passes
are counted with hooks on the encoder: a forward hook, and a backward hook on its output
(once per backward that reaches it, input-only ascent backwards included); SMART's teacher
is counted with the model. FreeAT's row is per optimizer step, one replay: it takes m of
them per batch. ASA's row includes its adversaries' own AdamW step.

    python bench/bench_methods.py                  # hidden 256, 4 layers, batch 8 x 128, 5 rounds
    python bench/bench_methods.py --json docs/methods-bench.json --markdown docs/methods-bench.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_step import SEED, add_model_arguments, build_models, build_shards

from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import Batches, ShardDataset
from pipeline.data.masking import MaskVocab
from pipeline.methods.adversarial import AdversarialConfig
from pipeline.methods.companion import Companion
from pipeline.methods.driver import drive
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.registry import METHODS, method_of
from pipeline.methods.smart import Teacher
from pipeline.model.masked_lm import MaskedLM
from pipeline.train.deepspeed_setup import make_optimizer

OPTIMIZER = argparse.Namespace(lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-6)


class Passes:
    """Counts forward and backward passes through a MaskedLM's encoder."""

    def __init__(self, *models: MaskedLM):
        self.forward = self.backward = 0
        for model in models:
            model.encoder().register_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        self.forward += 1
        if output.last_hidden_state.requires_grad:
            output.last_hidden_state.register_hook(self._backward)

    def _backward(self, grad):
        self.backward += 1


def method_step(method: str, model: MaskedLM, companion: Companion | None):
    config = AdversarialConfig(method=method, start_step=0)
    optimizer = make_optimizer(model, OPTIMIZER, {})
    done, carry = 0, ReplayPerturbation()

    def step(batch) -> None:
        nonlocal done, carry
        ids, mask, index = batch.input_ids, batch.attention_mask, batch.masked_index
        carry = carry if method_of(config).replay_index(done) else ReplayPerturbation()
        drive(
            config,
            step=done,
            forward=lambda d: model(ids, mask, index, d),
            ascent_forward=lambda d: model(ids, mask, index, d)[0],
            labels=batch.labels,
            backward=torch.Tensor.backward,
            real_tokens=mask,
            companion=companion,
            module_forward=lambda module: module(ids, mask, index)[0],
            carry=carry,
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if companion is not None:
            companion.after_step(model, OPTIMIZER.lr)
        done += 1

    return step


def measure(steps: dict, batches: list, rounds: int, warmup: int) -> list[dict]:
    names = list(steps)
    for batch in batches[:warmup]:
        for step in steps.values():
            step(batch)
    results = []
    for r in range(rounds):
        times = {name: [] for name in names}
        for s, batch in enumerate(batches[warmup:]):
            for name in names[s % len(names) :] + names[: s % len(names)]:  # rotate who goes first
                started = time.perf_counter()
                steps[name](batch)
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(values) for name, values in times.items()}
        results.append({name: medians[name] / medians["none"] for name in names})
        print(
            f"round {r + 1}: standard {medians['none'] * 1e3:.0f} ms | "
            + " | ".join(f"{name} {results[-1][name]:.2f}x" for name in names[1:]),
            flush=True,
        )
    return results


def markdown(summary: dict, setup: str) -> str:
    lines = [
        f"# Adversarial methods: step time over the standard step\n\n{setup}\n",
        "Regenerate: `python bench/bench_methods.py --json docs/methods-bench.json --markdown "
        "docs/methods-bench.md`.\n",
        "| method | step time / standard (median over rounds) | rounds | encoder forwards | encoder backwards (one per "
        "graph: input-only ascents, then each graph the loss trains) |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary["methods"].items():
        lines.append(
            f"| {name} | {row['ratio']:.2f} | {', '.join(f'{r:.2f}' for r in row['rounds'])} | {row['forwards']} | "
            f"{row['backwards']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="steps of each method per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        tokenizer = load_tokenizer(build_shards(Path(tmp), args.vocab, args.seq_len, args.threads))
        dataset = ShardDataset(Path(tmp) / "shards", "train")
        batches_of = Batches(
            dataset, MaskVocab.of(tokenizer), global_batch_size=args.batch, micro_batch_size=args.batch, seed=SEED
        )
        batches = [
            batches_of.for_step(s, s * args.batch, 0.15).micro_batches[0] for s in range(args.warmup + args.steps)
        ]
        _, base, _ = build_models(Path(tmp), tokenizer, dataset.seq_len, args)
        models = {name: copy.deepcopy(base).train() for name in METHODS}
        companions = {
            name: method_of(AdversarialConfig(method=name)).companion(model, model.hf, OPTIMIZER.weight_decay, 1.0)
            for name, model in models.items()
        }
        teachers = {name: [c.module] for name, c in companions.items() if isinstance(c, Teacher)}
        passes = {name: Passes(model, *teachers.get(name, ())) for name, model in models.items()}
        steps = {name: method_step(name, model, companions[name]) for name, model in models.items()}
        steps_total = args.warmup + args.rounds * args.steps
        rounds = measure(steps, batches, args.rounds, args.warmup)
    setup = (
        f"BERT hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq_len}, mask rate 0.15, fp32, "
        f"{args.threads} CPU threads, dropout on; every method at its defaults (K = 1 for ALUM, 3 for PGD, 2 for "
        "FreeLB; "
        f"YOPO m = 2, n = 3; FreeAT m = 2, per replay), "
        f"{args.rounds} rounds of {args.steps} steps each, after {args.warmup} warm-up steps."
    )
    summary = {
        "setup": setup,
        "methods": {
            name: {
                "ratio": statistics.median(r[name] for r in rounds),
                "rounds": [r[name] for r in rounds],
                "forwards": passes[name].forward // steps_total,
                "backwards": passes[name].backward // steps_total,
            }
            for name in METHODS
        },
    }
    table = markdown(summary, setup)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
