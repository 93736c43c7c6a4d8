"""`alum finetune`: sequence classification from an exported (or any HF BERT/RoBERTa) model,
with the standard objective, with ALUM (alpha = 1 by default, as the paper fine-tunes) or
with any other method of `adversarial.method` at its defaults.

ALUM fine-tuning is the pretraining objective applied to the classification logits:
cross-entropy plus alpha times the symmetric KL between the clean and the adversarially
perturbed predictions (`pipeline.methods.adversarial.compute_losses`, the same code, perturbation
defaults and dropout replay as pretraining; one row per example instead of per masked token).

Each seed fixes the classifier head's initialisation, the dropout stream and the example
order, so a seed's run is reproducible. `--train-subset N` trains on a fixed sample of N
training examples that no seed changes (`pipeline.data.glue.train_subset`), so runs over
seeds and models compare on the same data. Per seed: dev accuracy every `--eval-every` steps
and at the end, the AdvGLUE accuracy when `--advglue` is given, the final model's predicted
label per dev (and AdvGLUE) example in the data's order (`"predictions"`: a digit string,
for paired comparisons such as McNemar's), and the fine-tuned model saved in HF format under
OUT/seed-N/. OUT/results.json has every seed plus mean and standard deviation. A seed whose
OUT/seed-N/result.json exists is not run again, so an interrupted multi-seed command
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from data_prep import atomic
from data_prep.errors import UserError
from pipeline.core.help_format import DefaultsHelpFormatter
from pipeline.data.glue import Task, load_task, train_subset
from pipeline.methods.adversarial import AdversarialConfig
from pipeline.methods.driver import drive
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.registry import FINETUNE_NAMES, method_of
from pipeline.model.masked_lm import local_device
from pipeline.tasks.classifier import (
    Classifier,
    check_model_dir,
    encode,
    label_digits,
    load_model,
    padded,
    predict,
    share_correct,
)
from pipeline.tasks.finetune_options import add_arguments, check_options, parse_seeds
from pipeline.train.config import TrainConfig
from pipeline.train.deepspeed_setup import (
    compute_dtype,
    deepspeed_config,
    full_fp32_state,
    make_optimizer,
    make_scheduler,
)
from pipeline.train.distributed import exit_process, init_distributed, shutdown_distributed
from pipeline.train.step import accumulating_backward

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.methods.companion import Companion
    from pipeline.methods.method import Method

RESULTS = "results.json"
Examples = tuple[list[list[int]], Tensor]  # encode()'s token ids per example and their labels


def train_settings(args: argparse.Namespace, examples: int, world: int) -> TrainConfig:
    """Fine-tuning's optimizer, schedule and batch as pretraining's `train` section, so the shared set-up
    (make_optimizer, make_scheduler, deepspeed_config) builds them: BERT's fine-tuning recipe (AdamW betas
    0.9/0.999, eps 1e-8, decay 0.01; 10% linear warm-up, then linear decay to 0 at the last step; clipping at 1)
    with --lr, and the global batch of --batch-size split over the ranks."""
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    steps = args.max_steps or args.epochs * math.ceil(examples / args.batch_size)
    return TrainConfig(
        max_steps=steps,
        global_batch_size=args.batch_size,
        micro_batch_size=args.batch_size // world,
        lr=args.lr,
        warmup_steps=max(1, int(0.1 * steps)),
        min_lr_ratio=0.0,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_eps=1e-8,
        grad_clip=1.0,
        precision=args.precision,
    )


@dataclass
class Fit:
    """What one seed trains with, built by `set_up`: passed as one to the step and the evaluation."""

    settings: TrainConfig
    model: Classifier
    engine: DeepSpeedEngine | None  # with --deepspeed: it owns the optimizer, the schedule and clipping
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    adversarial: AdversarialConfig  # the method's settings (--method at its defaults, --alpha)
    method: Method
    companion: Companion | None  # a method's second model (SMART's mean teacher), else None
    device: torch.device


def finetune_seed(args: argparse.Namespace, task: Task, seed: int) -> dict:
    """Fine-tune one seed; returns its result (accuracies, history) and saves the model.

    Under DeepSpeed (`--deepspeed`) every rank draws the same global batch of --batch-size
    examples and takes its own contiguous share, so the examples an optimizer step sees do
    not depend on the number of ranks."""
    model, tokenizer = load_model(args.model, len(task.labels), seed, adversarial_config(args).perturb_at)
    train = encode(tokenizer, task.train, args.max_length)
    dev = encode(tokenizer, task.dev, args.max_length)
    _, world = _ranks()
    fit = set_up(args, model, train_settings(args, len(train[0]), world), world)
    started = time.perf_counter()
    history, dev_predicted = train_loop(args, fit, seed, train, dev, pad_id=tokenizer.pad_token_id, started=started)
    result = {
        "seed": seed,
        "steps": fit.settings.max_steps,
        "ranks": world,
        "seconds": time.perf_counter() - started,
        "dev_accuracy": history[-1]["dev_accuracy"],
        "history": history,
        "predictions": {"dev": label_digits(dev_predicted, len(task.labels))},
    }
    finish(args, fit, task, seed, result, tokenizer=tokenizer)
    return result


def adversarial_config(args: argparse.Namespace) -> AdversarialConfig:
    """--method at its defaults, with --alpha."""
    return AdversarialConfig(method=FINETUNE_NAMES[args.method], alpha=args.alpha)


def set_up(args: argparse.Namespace, model: Classifier, settings: TrainConfig, world: int) -> Fit:
    """The optimizer, LR schedule and method around `model`, built by the code pretraining builds them with,
    inside a DeepSpeed engine with --deepspeed (ZeRO from its JSON), else on this process's device."""
    ds_config = deepspeed_config(args.deepspeed, settings, world) if args.deepspeed else {}
    if not args.deepspeed:
        model.to(local_device())
    optimizer = make_optimizer(model, settings, ds_config)
    schedule = make_scheduler(optimizer, settings)
    adversarial = adversarial_config(args)
    method = method_of(adversarial)
    companion = method.companion(model, model.hf, settings.weight_decay, settings.grad_clip)
    engine, device, dtype = None, local_device(), torch.float32
    if args.deepspeed:
        import deepspeed

        engine, optimizer, _, schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        device, dtype = engine.device, compute_dtype(engine)
    companion = companion and companion.to(device, dtype)
    return Fit(settings, model, engine, optimizer, schedule, adversarial, method, companion, device)


def batches(fit: Fit, examples: int, seed: int) -> Iterator[tuple[int, list[int], ReplayPerturbation]]:
    """Per optimizer step: (step, this rank's share of the step's global batch as indices into the training set,
    FreeAT's perturbation carried between replays of one batch). The order is a permutation per epoch drawn from
    the seed alone, so a seed's batches do not depend on the number of ranks; a method that replays a batch
    (FreeAT) draws the next one only at its boundaries."""
    rank, world = _ranks()
    size = fit.settings.global_batch_size
    per_epoch = math.ceil(examples / size)
    generator = torch.Generator().manual_seed(seed)
    position, order, carry = 0, torch.empty(0, dtype=torch.long), ReplayPerturbation()  # position: batches drawn so far
    for step in range(fit.settings.max_steps):
        replay = fit.method.replay_index(step)
        if position % per_epoch == 0 and replay == 0:
            order = torch.randperm(examples, generator=generator)
        carry = carry if replay else ReplayPerturbation()
        chosen = order[(position % per_epoch) * size :][:size].tolist()
        share = math.ceil(len(chosen) / world)
        yield step, chosen[rank * share : (rank + 1) * share], carry
        position += fit.method.at_boundary(step + 1)


def train_loop(
    args: argparse.Namespace, fit: Fit, seed: int, train: Examples, dev: Examples, *, pad_id: int, started: float
) -> tuple[list[dict], Tensor]:
    """Every optimizer step of the seed, with the dev accuracy every --eval-every steps and at the last: the
    history result.json keeps, and the last evaluation's predicted dev labels (the final model's, from the pass
    that gave its accuracy). Every rank evaluates the whole dev set, so rank 0's are all of them, in order.
    Progress is a bar on a terminal, else a line per evaluation (rank 0 only)."""
    rank, _ = _ranks()
    torch.manual_seed(seed * 1000 + 1 + rank)  # the dropout stream
    (train_ids, train_labels), total, history = train, fit.settings.max_steps, []
    steps = batches(fit, len(train_ids), seed)
    desc = f"seed {seed} ({args.method})"
    progress = tqdm(steps, total=total, desc=desc, unit="step", disable=None if rank == 0 else True)
    for step, mine, carry in progress:
        input_ids, mask = (t.to(fit.device) for t in padded([train_ids[i] for i in mine], pad_id))
        loss = optimizer_step(
            fit, step, input_ids=input_ids, mask=mask, labels=train_labels[mine].to(fit.device), carry=carry
        )
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            predicted = predict(fit.model, dev[0], pad_id=pad_id, device=fit.device)
            dev_accuracy = share_correct(predicted, dev[1])
            history.append({"step": step + 1, "loss": loss.item(), "dev_accuracy": dev_accuracy})
            progress.set_postfix(loss=f"{history[-1]['loss']:.3f}", dev=f"{dev_accuracy:.3f}")
            if progress.disable and rank == 0:  # no terminal (piped, logged): a line per evaluation instead of the bar
                print(
                    f"{desc}: step {step + 1}/{total} | loss {history[-1]['loss']:.4f} | dev accuracy "
                    f"{dev_accuracy:.4f} | {(step + 1) / (time.perf_counter() - started):.1f} steps/s",
                    flush=True,
                )
    return history, predicted


def optimizer_step(
    fit: Fit, step: int, *, input_ids: Tensor, mask: Tensor, labels: Tensor, carry: ReplayPerturbation
) -> Tensor:
    """One optimizer step of the method on this rank's batch: each of its passes (clean, adversarial, the
    ascent's) backward, through the DeepSpeed engine, which clips and steps, or plainly with clipping; then the
    companion's update at the step's learning rate. Returns the step's loss (on the device: no host sync)."""
    engine, model = fit.engine, fit.model
    forward, ascent = (engine, engine.module) if engine else (model, model)
    lr = fit.schedule.get_last_lr()[0]
    if not engine:
        fit.optimizer.zero_grad(set_to_none=True)
    out = drive(
        fit.adversarial,
        step=step,
        forward=lambda d: forward(input_ids, mask, d),
        ascent_forward=lambda d: ascent(input_ids, mask, d)[0],
        labels=labels,
        backward=accumulating_backward(engine, fit.method.passes(step)) if engine else Tensor.backward,
        real_tokens=mask,
        companion=fit.companion,
        module_forward=lambda module: module(input_ids, mask)[0],
        carry=carry,
    )
    if engine:
        engine.step()
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), fit.settings.grad_clip)
        fit.optimizer.step()
        fit.schedule.step()
    if fit.companion is not None:
        fit.companion.after_step(engine.module if engine else model, lr)
    return out.loss


def finish(args: argparse.Namespace, fit: Fit, task: Task, seed: int, result: dict, *, tokenizer) -> None:
    """The AdvGLUE accuracy and predicted labels (with --advglue; one pass, on every rank, so rank 0 has them all)
    into `result`, then the model and result.json under OUT/seed-N/, written by rank 0 from the fp32 weights every
    rank helps gather; the other ranks wait for the files, so no rank starts the next seed before this one is on
    disk."""
    if task.adversarial:
        adv_ids, adv_labels = encode(tokenizer, task.adversarial, args.max_length)
        predicted = predict(fit.model, adv_ids, pad_id=tokenizer.pad_token_id, device=fit.device)
        result["advglue_accuracy"] = share_correct(predicted, adv_labels)
        result["predictions"]["advglue"] = label_digits(predicted, len(task.labels))
    weights = full_fp32_state(fit.model.hf)  # every rank takes part: the master weights are partitioned over them
    if _ranks()[0] == 0:
        _save(fit.model, weights, tokenizer=tokenizer, task=task, out=Path(args.out) / f"seed-{seed}", result=result)
    if fit.engine:
        import deepspeed.comm as dist

        dist.barrier()  # the seed's files exist before any rank moves on


def _ranks() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _save(model: Classifier, weights: dict[str, Tensor], *, tokenizer, task: Task, out: Path, result: dict) -> None:
    """The HF model with `weights` (fp32; labels named in its config) and the seed's result.json, written last."""
    model.hf.config.id2label = dict(enumerate(task.labels))
    model.hf.config.label2id = {name: i for i, name in enumerate(task.labels)}
    model.hf.save_pretrained(str(out), state_dict=weights)
    # save_pretrained wrote the module's dtype (bf16 under DeepSpeed bf16), not the weights'
    model.hf.config.dtype = "float32"
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
        "train_subset": args.train_subset,
        "train_examples": len(task.train),
        "dev_majority_baseline": majority(task.dev, len(task.labels)),
        "dev_accuracy": spread("dev_accuracy"),
        "advglue_majority_baseline": majority(task.adversarial, len(task.labels)) if task.adversarial else None,
        "advglue_accuracy": spread("advglue_accuracy"),
        "seeds": results,
    }


def majority(examples, num_labels: int) -> float:
    """The accuracy of always answering the commonest label: what an accuracy must beat."""
    return max(sum(e.label == c for e in examples) for c in range(num_labels)) / len(examples)


def run(args: argparse.Namespace) -> dict:
    check_options(args)
    seeds = parse_seeds(args.seeds)
    check_model_dir(args.model)
    task = train_subset(load_task(args.task, args.data, args.advglue), args.train_subset)
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
