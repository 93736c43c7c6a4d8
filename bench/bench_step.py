"""Benchmark one training step: the project's MLM step vs HF's, ALUM vs standard, data loading.

Three ratios, all taken on CPU in fp32 with plain PyTorch (a module, `torch.optim.AdamW`
from `pipeline.train.deepspeed_setup.make_optimizer`, `loss.backward()`, `optimizer.step()`). No DeepSpeed
engine: the ratios are about the computation of a step, which the engine wraps without
changing it; its own per-step work (gradient clipping, ZeRO bookkeeping) is the same for
every variant and is left out. The model is a small BERT built by the project's own
`hf_config` / `build_model`, in train mode (dropout on); every variant starts from the
same weights, and a check in eval mode confirms HF and the project compute the same loss.

1. Standard step: `MaskedLM` (LM head on the masked positions only) + `mlm_loss` +
   backward + step, against HF `BertForMaskedLM(..., labels=...)` (logits at every position,
   labels -100 where nothing is masked) on the same batches. Tokens/s of each and the
   ratio project / HF (target >= 1.3).
2. ALUM step: `compute_losses` with adversarial.method=alum, K=1, start_step=0, its
   `forward` / `ascent_forward` closures calling `MaskedLM` directly (as
   `pipeline.train.step.train_step` does through the engine), + backward + step. Time ratio
   ALUM / standard (target <= 2.8; the FLOP count gives about 2.67).
3. Data: `pipeline.data.batches.Batches.for_step` (sample order, `ShardDataset` rows, masking, tensors)
   for one global batch of the benchmark's size, on real shards (a tokenizer trained and
   WikiText-2 train sharded once, into a temporary directory, with the project's API). Its
   time as a fraction of the standard step (target <= 3%) and of the ALUM step.

The batches are real masked batches from those shards at the given mask rate. This
machine is shared and noisy: within each round the variants run interleaved, one step
each in turn, and each round reports the median step time of each variant and the ratios
of those medians; the summary is the median over rounds of each ratio.

On CPU, glibc hands large freed blocks back to the OS, and a step whose peak memory
exceeds the last one's (ALUM's, with its extra graphs and [N, V] KL tensors) then pays
page faults on fresh pages. `--malloc-keep` turns that off (mallopt: no trimming, a fixed
32 MiB mmap threshold) to show the step without that cost; the trainer does not do it.

    python bench/bench_step.py                     # hidden 256, 4 layers, batch 8 x 128, 5 rounds
    python bench/bench_step.py --rounds 2 --steps 3 --batch 16 --vocab 16000
    python bench/bench_step.py --malloc-keep       # without glibc's page-fault cost
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from data_dir import wikitext_train

from data_prep.corpus import ReadOptions
from data_prep.inputs import expand_inputs
from data_prep.shard import ShardSettings, shard_corpus
from data_prep.tokenizer import train_tokenizer
from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import Batches, ShardDataset
from pipeline.data.masking import MaskVocab
from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.methods.objective import mlm_loss
from pipeline.model.masked_lm import MaskedLM, build_model, hf_config
from pipeline.train.deepspeed_setup import make_optimizer

REPO = Path(__file__).resolve().parents[1]
SEED = 0


def build_shards(work: Path, vocab_size: int, seq_len: int, threads: int) -> Path:
    """A tokenizer trained on WikiText-2 train, and that file sharded at `seq_len`."""
    tokenizer = work / "tokenizer"
    inputs = [str(wikitext_train())]
    train_tokenizer(expand_inputs(inputs), ReadOptions(), tokenizer, vocab_size=vocab_size, threads=threads)
    shard_corpus(inputs, tokenizer, work / "shards", settings=ShardSettings(seq_len=seq_len), workers=threads)
    return tokenizer


def build_models(work: Path, tokenizer, seq_len: int, args) -> tuple[torch.nn.Module, MaskedLM, MaskedLM]:
    """The HF baseline, the project's standard-step model and its ALUM-step model, same weights."""
    spec = work / "model.yaml"
    spec.write_text(
        f"arch: bert\nhidden_size: {args.hidden}\nnum_hidden_layers: {args.layers}\n"
        f"num_attention_heads: {args.heads}\nintermediate_size: {args.intermediate}\n"
        f"max_position_embeddings: {max(512, seq_len)}\nhidden_dropout_prob: 0.1\nattention_probs_dropout_prob: 0.1\n"
    )
    config = hf_config(str(spec), tokenizer.vocab_size, tokenizer.special_token_ids, seq_len)
    torch.manual_seed(SEED)
    hf = build_model(config, None, activation_checkpointing=False)
    standard = MaskedLM(copy.deepcopy(hf), "embedding_output")
    alum = MaskedLM(copy.deepcopy(hf), "embedding_output")
    return hf, standard, alum


def keep_freed_memory() -> None:
    """glibc: keep freed memory in the process (no trimming, blocks up to 32 MiB from the heap)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_threshold, 32 << 20)):
        raise SystemExit("--malloc-keep: mallopt failed")


def check_same_objective(hf, model: MaskedLM, batch) -> float:
    """|HF loss - project loss| in eval mode: both variants must compute the same MLM loss."""
    hf.eval()
    model.eval()
    with torch.no_grad():
        reference = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=hf_labels(batch)).loss
        logits, _ = model(batch.input_ids, batch.attention_mask, batch.masked_index)
        ours = mlm_loss(logits, batch.labels)
    hf.train()
    model.train()
    return abs(reference.item() - ours.item())


def hf_labels(batch) -> torch.Tensor:
    labels = torch.full_like(batch.input_ids, -100)
    labels[batch.masked] = batch.labels
    return labels


def make_steps(hf, standard: MaskedLM, alum: MaskedLM) -> dict:
    """One training step of each variant, as a function of a micro-batch."""
    train = SimpleNamespace(lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-6)
    optimizers = {
        name: make_optimizer(m, train, {}) for name, m in (("hf", hf), ("standard", standard), ("alum", alum))
    }
    adversarial = AdversarialConfig(method="alum", start_step=0, steps=1)

    def update(name: str, loss: torch.Tensor) -> None:
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    def hf_step(batch) -> None:
        update("hf", hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=hf_labels(batch)).loss)

    def standard_step(batch) -> None:
        logits, _ = standard(batch.input_ids, batch.attention_mask, batch.masked_index)
        update("standard", mlm_loss(logits, batch.labels))

    def alum_step(batch) -> None:
        ids, mask, masked_index = batch.input_ids, batch.attention_mask, batch.masked_index
        out = compute_losses(
            lambda delta: alum(ids, mask, masked_index, delta),
            lambda delta: alum(ids, mask, masked_index, delta)[0],
            batch.labels,
            adversarial,
            step=0,
        )
        update("alum", out.loss)

    return {"hf": hf_step, "standard": standard_step, "alum": alum_step}


def measure(steps: dict, load, batches: list, args, tokens: int) -> list[dict]:
    """Per round: each variant's median step time, interleaved step by step, and the ratios."""
    names = list(steps)
    for batch in batches[: args.warmup]:
        for step in steps.values():
            step(batch)
        load(0)
    rounds = []
    for r in range(args.rounds):
        times = {name: [] for name in (*names, "data")}
        for s, batch in enumerate(batches[args.warmup :]):
            for name in names[s % 3 :] + names[: s % 3]:  # rotate who goes first
                started = time.perf_counter()
                steps[name](batch)
                times[name].append(time.perf_counter() - started)
            for k in range(3):  # a few ms each: three calls per turn, each a sample
                started = time.perf_counter()
                load(1000 * r + 10 * s + k)
                times["data"].append(time.perf_counter() - started)
        m = {name: statistics.median(values) for name, values in times.items()}
        result = {
            **m,
            "hf_tok_s": tokens / m["hf"],
            "standard_tok_s": tokens / m["standard"],
            "speedup": m["hf"] / m["standard"],
            "alum_ratio": m["alum"] / m["standard"],
            "data_standard": m["data"] / m["standard"],
            "data_alum": m["data"] / m["alum"],
        }
        rounds.append(result)
        print(
            f"round {r + 1}: HF {m['hf'] * 1e3:5.0f} ms ({result['hf_tok_s']:,.0f} tok/s) | "
            f"project {m['standard'] * 1e3:5.0f} ms ({result['standard_tok_s']:,.0f} tok/s) | "
            f"ALUM {m['alum'] * 1e3:5.0f} ms | data {m['data'] * 1e3:4.1f} ms | "
            f"project/HF {result['speedup']:.2f}x | ALUM/standard {result['alum_ratio']:.2f} | "
            f"data {result['data_standard']:.2%} of standard, {result['data_alum']:.2%} of ALUM",
            flush=True,
        )
    return rounds


def report(rounds: list[dict]) -> None:
    def summary(key: str, spec: str = ".2f") -> tuple[float, str]:
        values = [r[key] for r in rounds]
        return statistics.median(values), ", ".join(format(v, spec) for v in values)

    hf_tok, _ = summary("hf_tok_s")
    std_tok, _ = summary("standard_tok_s")
    speedup, speedups = summary("speedup")
    ratio, ratios = summary("alum_ratio")
    data_ms, _ = summary("data")
    data_std, data_stds = summary("data_standard", ".2%")
    data_alum, data_alums = summary("data_alum", ".2%")
    print(
        f"median standard step: project {std_tok:,.0f} tok/s vs HF BertForMaskedLM {hf_tok:,.0f} tok/s: "
        f"project/HF {speedup:.2f}x (target >= 1.3; rounds: {speedups})"
    )
    print(f"median ALUM step (K=1) / standard step: {ratio:.2f} (target <= 2.8, FLOP bound ~2.67; rounds: {ratios})")
    print(
        f"median data loading + masking: {data_ms * 1e3:.1f} ms = {data_std:.2%} of the standard step "
        f"(target <= 3%; rounds: {data_stds}), {data_alum:.2%} of the ALUM step (rounds: {data_alums})"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmarked model's and batch's sizes (bench/bench_methods.py uses the same)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument(
        "--vocab", type=int, default=8000, help="tokenizer vocabulary size (the model's, rounded up to 64)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (global batch = micro-batch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--mask-rate", type=float, default=0.15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="steps of each variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc-keep", action="store_true", help="glibc keeps freed memory (no page faults on reuse)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc_keep:
        keep_freed_memory()

    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        tokenizer = load_tokenizer(build_shards(work, args.vocab, args.seq_len, args.threads))
        dataset = ShardDataset(work / "shards", "train")
        prep = time.perf_counter() - started
        batches_of = Batches(
            dataset, MaskVocab.of(tokenizer), global_batch_size=args.batch, micro_batch_size=args.batch, seed=SEED
        )

        def load(step: int):
            """The trainer's per-step data work for one global batch of args.batch sequences."""
            return batches_of.for_step(step, step * args.batch, args.mask_rate).micro_batches[0]

        hf, standard, alum = build_models(work, tokenizer, dataset.seq_len, args)
        batches = [load(step) for step in range(args.warmup + args.steps)]
        scored = statistics.mean(b.labels.numel() for b in batches) / (args.batch * dataset.seq_len)
        gap = check_same_objective(hf, standard, batches[0])
        print(
            f"model: BERT hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
            f"{args.intermediate}, "
            f"vocab {hf.config.vocab_size}, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters; "
            f"batch {args.batch} x {dataset.seq_len}, mask rate {args.mask_rate} ({scored:.1%} of tokens scored); "
            f"fp32, {torch.get_num_threads()} threads, dropout on, "
            f"malloc {'keeps freed memory' if args.malloc_keep else 'glibc default'}"
        )
        print(
            f"data: {len(dataset):,} rows of WikiText-2 train, tokenizer + shards built in {prep:.1f} s; "
            f"|HF loss - project loss| in eval mode = {gap:.1e}"
        )
        rounds = measure(make_steps(hf, standard, alum), load, batches, args, args.batch * dataset.seq_len)
        report(rounds)


if __name__ == "__main__":
    main()
