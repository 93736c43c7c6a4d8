"""`alum finetune`: sequence classification from an exported (or any HF BERT/RoBERTa) model,
with the standard objective, with ALUM (alpha = 1 by default, as the paper fine-tunes) or
with any other method of `adversarial.method` at its defaults.

ALUM fine-tuning is the pretraining objective applied to the classification logits:
cross-entropy plus alpha times the symmetric KL between the clean and the adversarially
perturbed predictions (`pipeline.methods.adversarial.compute_losses`, the same code, perturbation
defaults and dropout replay as pretraining; one row per example instead of per masked token).

Each seed fixes the classifier head's initialisation, the dropout stream and the example
order, so a seed's run is reproducible. Per seed: dev accuracy every `--eval-every` steps
and at the end, the AdvGLUE accuracy when `--advglue` is given, and the fine-tuned model
saved in HF format under OUT/seed-N/. OUT/results.json has every seed plus mean and
standard deviation. A seed whose OUT/seed-N/result.json exists is not run again, so an
interrupted multi-seed command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from tqdm import tqdm

from data_prep import atomic
from data_prep.errors import UserError
from pipeline.core.help_format import DefaultsHelpFormatter
from pipeline.data.glue import Task, load_task
from pipeline.methods.adversarial import AdversarialConfig
from pipeline.methods.driver import drive
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.registry import FINETUNE_NAMES, method_of
from pipeline.model.masked_lm import ARCHS, Perturbation, local_device
from pipeline.train.deepspeed_setup import (
    compute_dtype,
    deepspeed_config,
    full_fp32_state,
    make_optimizer,
    make_scheduler,
)
from pipeline.train.distributed import exit_process, init_distributed, shutdown_distributed
from pipeline.train.step import accumulating_backward

RESULTS = "results.json"


class Classifier(nn.Module):
    """An HF sequence classifier whose embeddings can be perturbed (for ALUM)."""

    def __init__(self, hf_model: nn.Module, perturb_at: str = "embedding_output"):
        super().__init__()
        self.hf = hf_model
        self.perturbation = Perturbation(getattr(hf_model, hf_model.base_model_prefix), perturb_at)

    def forward(self, input_ids, attention_mask, delta=None):
        """(logits [B, num_labels], the perturbable embeddings [B, T, H])."""
        return self.perturbation.run(delta, lambda: self.hf(input_ids=input_ids, attention_mask=attention_mask).logits)


def load_model(model_dir: str | Path, num_labels: int, seed: int):
    """(Classifier, tokenizer) from a BERT/RoBERTa directory; the new head is seeded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
    logging.disable_progress_bar()
    path = check_model_dir(model_dir)
    torch.manual_seed(seed)
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=num_labels, attn_implementation="sdpa"
    )
    return Classifier(hf), AutoTokenizer.from_pretrained(str(path))


def check_model_dir(model_dir: str | Path) -> Path:
    """A BERT/RoBERTa HF directory, checked from its config.json alone (before any loading)."""
    path = Path(model_dir)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise UserError(f"--model: {path}: not a Hugging Face model directory (no readable config.json)") from None
    if model_type not in ARCHS:
        raise UserError(f"--model: {path}: model type {model_type!r} is not BERT or RoBERTa")
    return path


def encode(tokenizer, examples, max_length: int) -> tuple[list[list[int]], torch.Tensor]:
    """Token ids per example (truncated to max_length, pairs joined the tokenizer's way) and labels."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    ids = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    return ids, torch.tensor([e.label for e in examples])


def padded(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded to its longest row: (input_ids, attention_mask)."""
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def accuracy(
    model: Classifier,
    ids,
    labels: torch.Tensor,
    *,
    pad_id: int,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> float:
    """The share of `ids` classified as `labels`, computed on `device` (the CPU by default)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            input_ids, mask = (t.to(device) for t in padded(ids[start : start + batch_size], pad_id))
            correct += (model(input_ids, mask)[0].argmax(-1) == labels[start : start + batch_size].to(device)).sum()
    model.train()
    return correct.item() / len(ids)


def finetune_seed(args, task: Task, seed: int) -> dict:
    """Fine-tune one seed; returns its result (accuracies, history) and saves the model.

    Under DeepSpeed (`--deepspeed`) every rank draws the same global batch of --batch-size
    examples and takes its own contiguous share, so the examples an optimizer step sees do
    not depend on the number of ranks."""
    model, tokenizer = load_model(args.model, len(task.labels), seed)
    pad_id = tokenizer.pad_token_id
    train_ids, train_labels = encode(tokenizer, task.train, args.max_length)
    dev_ids, dev_labels = encode(tokenizer, task.dev, args.max_length)
    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    total = args.max_steps or args.epochs * steps_per_epoch
    rank, world = _ranks()
    schedule_config = SimpleNamespace(
        lr=args.lr,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_eps=1e-8,
        warmup_steps=max(1, int(0.1 * total)),
        max_steps=total,
        decay_steps=0,
        min_lr_ratio=0.0,
    )
    ds_config = _deepspeed_config(args, world) if args.deepspeed else {}
    if not args.deepspeed:
        model.to(local_device())
    optimizer = make_optimizer(model, schedule_config, ds_config)
    schedule = make_scheduler(optimizer, schedule_config)
    adversarial = AdversarialConfig(method=FINETUNE_NAMES[args.method], alpha=args.alpha)
    method = method_of(adversarial)
    companion = method.companion(model, model.hf, schedule_config.weight_decay, 1.0)
    engine, device, dtype = None, local_device(), torch.float32
    if args.deepspeed:
        import deepspeed

        engine, optimizer, _, schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        device, dtype = engine.device, compute_dtype(engine)
    companion = companion and companion.to(device, dtype)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed * 1000 + 1 + rank)  # the dropout stream
    history, started, order = [], time.perf_counter(), torch.empty(0, dtype=torch.long)
    progress = tqdm(range(total), desc=f"seed {seed} ({args.method})", unit="step", disable=None if rank == 0 else True)
    position, carry = 0, ReplayPerturbation()  # batches drawn so far; FreeAT's perturbation between replays of one
    for step in progress:
        replay = method.replay_index(step)
        if position % steps_per_epoch == 0 and replay == 0:
            order = torch.randperm(len(train_ids), generator=generator)
        carry = carry if replay else ReplayPerturbation()
        chosen = order[(position % steps_per_epoch) * args.batch_size :][: args.batch_size].tolist()
        share = math.ceil(len(chosen) / world)
        mine = chosen[rank * share : (rank + 1) * share]
        input_ids, mask = (t.to(device) for t in padded([train_ids[i] for i in mine], pad_id))
        forward, ascent = (engine, engine.module) if engine else (model, model)
        lr = schedule.get_last_lr()[0]
        if not engine:
            optimizer.zero_grad(set_to_none=True)
        out = drive(
            adversarial,
            step=step,
            forward=lambda d: forward(input_ids, mask, d),
            ascent_forward=lambda d: ascent(input_ids, mask, d)[0],
            labels=train_labels[mine].to(device),
            backward=accumulating_backward(engine, method.passes(step)) if engine else Tensor.backward,
            real_tokens=mask,
            companion=companion,
            module_forward=lambda module: module(input_ids, mask)[0],
            carry=carry,
        )
        if engine:
            engine.step()
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        if companion is not None:
            companion.after_step(engine.module if engine else model, lr)
        position += method.at_boundary(step + 1)
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            history.append(
                {
                    "step": step + 1,
                    "loss": out.loss.item(),
                    "dev_accuracy": accuracy(model, dev_ids, dev_labels, pad_id=pad_id, device=device),
                }
            )
            progress.set_postfix(loss=f"{history[-1]['loss']:.3f}", dev=f"{history[-1]['dev_accuracy']:.3f}")
            if progress.disable and rank == 0:  # no terminal (piped, logged): a line per evaluation instead of the bar
                print(
                    f"seed {seed} ({args.method}): step {step + 1}/{total} | loss {history[-1]['loss']:.4f} | dev "
                    "accuracy "
                    f"{history[-1]['dev_accuracy']:.4f} | {(step + 1) / (time.perf_counter() - started):.1f} steps/s",
                    flush=True,
                )
    result = {
        "seed": seed,
        "steps": total,
        "ranks": world,
        "seconds": time.perf_counter() - started,
        "dev_accuracy": history[-1]["dev_accuracy"],
        "history": history,
    }
    if task.adversarial:
        adv_ids, adv_labels = encode(tokenizer, task.adversarial, args.max_length)
        result["advglue_accuracy"] = accuracy(model, adv_ids, adv_labels, pad_id=pad_id, device=device)
    weights = full_fp32_state(model.hf)  # every rank takes part: the master weights are partitioned over them
    if rank == 0:
        _save(model, weights, tokenizer=tokenizer, task=task, out=Path(args.out) / f"seed-{seed}", result=result)
    if engine:
        import deepspeed.comm as dist

        dist.barrier()  # the seed's files exist before any rank moves on
    return result


def _ranks() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _deepspeed_config(args, world: int) -> dict:
    """The ZeRO settings of --deepspeed's JSON, with the batch split over the ranks (fp32 on CPU)."""
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    run = SimpleNamespace(
        deepspeed=args.deepspeed,
        train=SimpleNamespace(
            global_batch_size=args.batch_size,
            micro_batch_size=args.batch_size // world,
            grad_clip=1.0,
            precision=args.precision,
        ),
    )
    return deepspeed_config(run, world)


def _save(model: Classifier, weights: dict[str, Tensor], *, tokenizer, task: Task, out: Path, result: dict) -> None:
    """The HF model with `weights` (fp32; labels named in its config) and the seed's result.json, written last."""
    model.hf.config.id2label = dict(enumerate(task.labels))
    model.hf.config.label2id = {name: i for i, name in enumerate(task.labels)}
    model.hf.save_pretrained(str(out), state_dict=weights)
    model.hf.config.dtype = (
        "float32"  # save_pretrained wrote the module's dtype (bf16 under DeepSpeed bf16), not the weights'
    )
    model.hf.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    atomic.write_bytes(out / "result.json", (json.dumps(result, indent=1) + "\n").encode())


def summarise(task: Task, args, results: list[dict]) -> dict:
    def spread(key: str) -> dict | None:
        values = [r[key] for r in results if key in r]
        if not values:
            return None
        return {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }

    return {
        "task": task.name,
        "model": str(args.model),
        "method": args.method,
        "alpha": args.alpha,
        "labels": list(task.labels),
        "dev_majority_baseline": majority(task.dev, len(task.labels)),
        "dev_accuracy": spread("dev_accuracy"),
        "advglue_majority_baseline": majority(task.adversarial, len(task.labels)) if task.adversarial else None,
        "advglue_accuracy": spread("advglue_accuracy"),
        "seeds": results,
    }


def majority(examples, num_labels: int) -> float:
    """The accuracy of always answering the commonest label: what an accuracy must beat."""
    return max(sum(e.label == c for e in examples) for c in range(num_labels)) / len(examples)


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


def run(args) -> dict:
    for name in ("lr", "batch_size", "epochs", "max_length", "eval_every"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.max_steps < 0:
        raise UserError(f"--max-steps: must not be negative, got {args.max_steps}")
    if not (math.isfinite(args.alpha) and args.alpha >= 0):
        raise UserError(f"--alpha: must be a finite number >= 0, got {args.alpha}")
    if args.precision not in ("auto", "fp32") and not args.deepspeed:
        raise UserError(f"--precision {args.precision}: needs --deepspeed (a run without it trains in fp32)")
    seeds = parse_seeds(args.seeds)
    check_model_dir(args.model)
    task = load_task(args.task, args.data, args.advglue)
    if args.deepspeed:
        init_distributed(600.0)
    out = Path(args.out)
    rank, _ = _ranks()
    say = print if rank == 0 else (lambda *a, **k: None)
    results = []
    for seed in seeds:
        done = out / f"seed-{seed}" / "result.json"
        results.append(json.loads(done.read_text()) if done.is_file() else finetune_seed(args, task, seed))
        line = f"seed {seed}: dev accuracy {results[-1]['dev_accuracy']:.4f}"
        say(
            line + (f", AdvGLUE {results[-1]['advglue_accuracy']:.4f}" if "advglue_accuracy" in results[-1] else ""),
            flush=True,
        )
    summary = summarise(task, args, results)
    if rank == 0:
        atomic.write_bytes(out / RESULTS, (json.dumps(summary, indent=1) + "\n").encode())
    for split in ("dev", "advglue"):
        if summary[f"{split}_accuracy"]:
            numbers = summary[f"{split}_accuracy"]
            say(
                f"{split} accuracy: {numbers['mean']:.4f} +- {numbers['std']:.4f} over {numbers['n']} seeds "
                f"(majority-class baseline {summary[f'{split}_majority_baseline']:.4f})"
            )
    say(f"results: {out / RESULTS}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alum finetune", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except UserError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())
