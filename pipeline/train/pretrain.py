"""The training entry point: `python -m pipeline.pretrain --config FILE --run-dir DIR [key=value ...]`.

The same command runs alone, under `deepspeed [--num_gpus N | --hostfile H] --module
pipeline.pretrain ...` and under `torchrun -m pipeline.pretrain ...`. Re-running it on an
existing run directory resumes from the latest complete checkpoint.

The loop, per optimizer step: this rank's masked micro-batches at the curriculum's rate
(`pipeline.data.batches.Batches`), the step (`pipeline.train.step.train_step`: MLM, plus ALUM from
`adversarial.start_step` on), the next step's batches built while the device runs it
(`pipeline.train.prefetch`), its stats gathered over the ranks in one read-back; then
validation, metrics and checkpoints, each on its own schedule (`due`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.utils import logger as deepspeed_logger

from data_prep.errors import UserError
from data_prep.tokenizer_dir import TokenizerInfo, load_tokenizer
from pipeline.core.help_format import DefaultsHelpFormatter
from pipeline.data.batches import Batches, ShardDataset
from pipeline.data.masking import MaskVocab
from pipeline.data.mixture import Mixture
from pipeline.methods.companion import Companion
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.registry import method_of
from pipeline.model.masked_lm import MaskedLM, build_model, check_init_from, hf_config
from pipeline.train import checkpoint
from pipeline.train.checkpoint import CheckpointedState, Checkpointer, step_of
from pipeline.train.config import RunConfig, TrainConfig, flatten, missing_paths, to_dict
from pipeline.train.deepspeed_setup import (
    compute_dtype,
    deepspeed_config,
    make_optimizer,
    make_scheduler,
    resolved_precision,
    zero_stage,
)
from pipeline.train.distributed import (
    check_same_config,
    distributed_ready,
    exit_process,
    init_distributed,
    on_every_rank,
    report,
    set_threads,
    shutdown_distributed,
)
from pipeline.train.flops import Throughput, peak_flops
from pipeline.train.metrics import MetricsLogger, check_wandb_login, step_record
from pipeline.train.prefetch import StepInputs
from pipeline.train.resume import StartPoint, TrainState, resume, start_point, verified
from pipeline.train.run_lock import RunLock
from pipeline.train.rundir import resolve_run_config, write_run_files
from pipeline.train.step import StepStats, TrainingAborted, advance_state, check_health, consumed_after, train_step
from pipeline.train.stop import StopRequest
from pipeline.train.training_data import Evaluators, TrainingData, open_training_data


class AlreadyFinished(Exception):
    """The run's latest checkpoint is at train.max_steps: nothing to train, no engine, no W&B run."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; `key=value` overrides may come anywhere, before or after the options."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pretrain", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints and W&B files go")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    return parser.parse_intermixed_args(argv)


def _quiet_libraries() -> None:
    """DeepSpeed's engine set-up INFO lines and torch's deprecation warning for the collective
    DeepSpeed calls would interleave with the progress lines on every rank; warnings stay."""
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    deepspeed_logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_libraries()
    try:
        train(args.config, Path(args.run_dir), args.overrides)
    except UserError as e:
        report(f"pretrain: error: {e}", every_rank=not distributed_ready())
        return 2
    except (TrainingAborted, checkpoint.SaveFailed) as e:
        report(f"pretrain: stopped: {e}")
        return 3
    except AlreadyFinished as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, flush=True)
    finally:
        shutdown_distributed()
    return 0


@dataclass
class Run:
    """Everything a launch sets up before its first step."""

    config: RunConfig
    run_dir: Path
    engine: deepspeed.DeepSpeedEngine
    tokenizer: TokenizerInfo
    dataset: ShardDataset | Mixture  # what the run trains on (data.train)
    data: TrainingData  # with the sources' names and the sets validated on
    vocab: MaskVocab
    start: StartPoint | None
    companion: Companion | None  # SMART's teacher or ASA's adversaries (pipeline.methods.companion)
    peak_flops: float | None  # of one accelerator, when known: perf/mfu is logged
    lock: RunLock | None  # rank 0's lock on the run directory (pipeline.train.run_lock)

    @property
    def checkpointed(self) -> list[CheckpointedState]:
        """What the checkpoints keep beside the engine: the method's companion, if it has one."""
        return [self.companion] if self.companion is not None else []


def prepare(config_path: str | None, run_dir: Path, overrides: list[str], finished_ok: bool = False) -> Run:
    """Process group, config, data checks, the run directory's lock, model and DeepSpeed engine
    (no checkpoint loaded). Nothing in the run directory is read before it is known to be a
    run's (resolve_run_config), nor written before rank 0 holds its lock. A run already at
    train.max_steps raises AlreadyFinished first, unless `finished_ok` (a caller that wants
    the engine of a finished run, not more training)."""
    # Read once, before the process group exists (its timeout is a config value); a config
    # that does not load is reported once the ranks can agree on the error, in checks().
    try:
        config, config_error = resolve_run_config(config_path, overrides, run_dir), None
    except UserError as e:
        config, config_error = None, e
    rank, world_size = init_distributed(config.train.dist_timeout_s if config else TrainConfig.dist_timeout_s)

    def checks():
        if config_error:
            raise config_error
        missing_paths(config)
        if rank == 0:
            check_wandb_login(config.wandb)
        tokenizer = load_tokenizer(config.data.tokenizer)
        data = open_training_data(config, tokenizer, rank, world_size)
        # A model to continue from brings its own architecture.
        if config.model.init_from:
            check_init_from(config.model.init_from)
        source = config.model.init_from or config.model.config
        model_config = hf_config(source, tokenizer.vocab_size, tokenizer.special_token_ids, data.seq_len)
        method_of(config.adversarial).check(config, model_config)
        return config, tokenizer, data, model_config, deepspeed_config(config.deepspeed, config.train, world_size)

    config, tokenizer, data, model_config, ds_config = on_every_rank(checks)
    check_same_config(flatten(to_dict(config)))
    # A second job on the run directory is refused here, on every rank; the checkpoints are
    # read only once this job holds it (one that held it a moment ago may just have saved).
    lock = on_every_rank(lambda: RunLock(run_dir) if rank == 0 else None)
    start = verified(on_every_rank(lambda: start_point(run_dir, config.checkpoint.init_from)), rank)
    if not finished_ok and start is not None and start.resume and step_of(start.tag) >= config.train.max_steps:
        raise AlreadyFinished(
            f"{run_dir}: already at train.max_steps={config.train.max_steps} ({start.tag}); "
            "nothing to do (raise train.max_steps to continue)"
        )
    if start is not None and start.world_size != world_size and zero_stage(ds_config) > 0:
        # ZeRO's partitioned optimizer state only loads on the world size that wrote it.
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    set_threads(config.train.threads_per_rank)
    torch.manual_seed(config.train.seed)
    model = MaskedLM(
        build_model(model_config, config.model.init_from, config.model.activation_checkpointing),
        config.adversarial.perturb_at,
    )
    companion = method_of(config.adversarial).companion(
        model, model.hf, config.train.weight_decay, config.train.grad_clip
    )
    optimizer = make_optimizer(model, config.train, ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, config.train), config=ds_config
    )
    companion = companion and companion.to(engine.device, compute_dtype(engine))
    if rank == 0:
        write_run_files(run_dir, config, model_config, tokenizer)
    dist.barrier()
    device_name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else engine.device.type
    precision = resolved_precision(config.train.precision)
    if rank == 0:
        gpu_note = "" if engine.device.type != "cpu" else " (no GPU found)"
        print(
            f"pretrain: {world_size} rank(s) on {device_name}{gpu_note}, {precision}, ZeRO stage "
            f"{zero_stage(ds_config)}",
            flush=True,
        )
    peak = peak_flops(device_name, precision, config.train.peak_tflops)
    return Run(
        config, run_dir, engine, tokenizer, data.train, data, MaskVocab.of(tokenizer), start, companion, peak, lock
    )


def train(config_path: str | None, run_dir: Path, overrides: list[str]) -> TrainState:
    run = prepare(config_path, run_dir, overrides)
    rank = int(os.environ["RANK"])
    StopRequest.install(run.config.train.signal_names())
    with run.lock or contextlib.nullcontext():
        state = resume(
            run.engine,
            run_dir=run_dir,
            start=run.start,
            config=run.config,
            rank=rank,
            world_size=int(os.environ["WORLD_SIZE"]),
            states=run.checkpointed,
        )
        logger = MetricsLogger(run_dir, run.config, state, enabled=rank == 0)
        state.wandb_id = logger.wandb_id
        try:
            _loop(run, state, logger)
        finally:
            logger.close()
    return state


def _loop(run: Run, state: TrainState, logger: MetricsLogger) -> None:
    config, engine, dataset = run.config, run.engine, run.dataset
    rank, world_size = dist.get_rank(), dist.get_world_size()
    max_steps, global_batch = config.train.max_steps, config.train.global_batch_size
    batches = Batches(
        dataset,
        run.vocab,
        global_batch_size=global_batch,
        micro_batch_size=config.train.micro_batch_size,
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
        pin_memory=engine.device.type == "cuda",
    )
    evaluator = Evaluators(engine, run.data.val_sets, config, run.vocab)
    checkpointer = Checkpointer(engine, run.run_dir, config, world_size, run.checkpointed)
    throughput = Throughput(
        engine.module.hf.config, global_batch * dataset.seq_len, dataset.seq_len, run.peak_flops, world_size
    )
    inputs = StepInputs(batches, config)
    method = method_of(config.adversarial)
    started = time.perf_counter()
    carries: list[ReplayPerturbation] = []  # FreeAT's perturbations, from one replay of a batch to the next
    while state.step < max_steps:
        batch, rate = inputs(state.step, state.consumed_samples)
        replay = method.replay_index(state.step)  # 0 unless FreeAT replays this batch
        carries = carries if replay and carries else [ReplayPerturbation() for _ in batch.micro_batches]
        sums = train_step(
            engine,
            batch.micro_batches,
            adversarial=config.adversarial,
            step=state.step,
            companion=run.companion,
            carries=carries,
        )
        if state.step + 1 < max_steps:  # the next step's batch, built while the device runs this one
            inputs(state.step + 1, consumed_after(config, state.step + 1, state.consumed_samples))
        stats = StepStats.gather(sums, stop=StopRequest.requested())
        advance_state(state, stats, config, engine)
        seconds = time.perf_counter() - started
        evaluated = evaluator() if evaluator.due(state.step) else {}
        if evaluated or logger.due(state.step):
            record = {
                **step_record(
                    stats,
                    state=state,
                    batch=batch,
                    mask_rate=rate,
                    adversarial=config.adversarial,
                    engine=engine,
                    companion=run.companion,
                ),
                **run.data.record(state.consumed_samples, config.train.seed),
                **throughput.record(seconds, rate),
                **evaluated,
            }
            logger.log(state.step, record)
            if rank == 0:
                print(_progress_line(state.step, max_steps, record), flush=True)
        check_health(state, stats, config, run.run_dir)
        if checkpointer.due(state, stats.stop):
            checkpointer.save(state)
        if stats.stop and method.at_boundary(state.step):
            if rank == 0:
                print(
                    f"stop requested ({StopRequest.reason or 'by another rank'}): saved step {state.step}; re-run the "
                    "same command to continue",
                    flush=True,
                )
            return
        started = time.perf_counter()


def _progress_line(step: int, max_steps: int, record: dict) -> str:
    line = (
        f"step {step}/{max_steps} | loss {record['train/loss']:.4f} (mlm {record['train/loss_mlm']:.4f}, "
        f"adv {record['train/loss_adv']:.2e}) | mask {record['train/mask_rate']:.0%} | lr {record['train/lr']:.2e} | "
        f"{record['perf/tokens_per_s']:,.0f} tok/s"
    )
    if "perf/mfu" in record:
        line += f" (MFU {record['perf/mfu']:.1%})"
    if "eval/loss" in record:
        line += (
            f" | eval ppl {record['eval/ppl']:.1f} acc {record['eval/accuracy']:.3f} "
            f"(commonest token {record['eval/commonest_token_accuracy']:.3f})"
        )
    named = [
        key.split("/")[1] for key in record if key.startswith("eval/") and key.endswith("/ppl") and key.count("/") == 2
    ]
    if named:  # a mixture's sources and eval.sets
        line += " | eval ppl " + ", ".join(f"{name} {record[f'eval/{name}/ppl']:.1f}" for name in named)
    return line


if __name__ == "__main__":
    exit_process(main())
