"""The training entry point: `python -m pipeline.pretrain --config FILE --run-dir DIR [key=value ...]`.

The same command runs alone, under `deepspeed [--num_gpus N | --hostfile H] --module
pipeline.pretrain ...` and under `torchrun -m pipeline.pretrain ...`. Re-running it on an
existing run directory resumes from the latest complete checkpoint.

The loop, per optimizer step: compute the global batch from `consumed_samples`, take this
rank's slice, mask it at the curriculum's rate, and for each micro-batch compute the
losses (`pipeline.adversarial.compute_losses`: MLM, plus ALUM from
`adversarial.start_step` on), `engine.backward`, `engine.step`. Then metrics, validation
and checkpoints on their schedules.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.errors import UserError
from pipeline.help_format import DefaultsHelpFormatter


class StopRequest:
    """Set by a stop signal; the ranks agree on it at the next step boundary.

    The handler only records the signal: the step in flight finishes, then every rank sees
    the request in the step's all-reduce, saves one checkpoint together and exits 0.
    """

    signal_name: str | None = None

    @classmethod
    def install(cls, names: str) -> None:
        for name in filter(None, (n.strip() for n in names.split(","))):
            signal.signal(getattr(signal, name), cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.signal_name = signal.Signals(signum).name


class TrainingAborted(Exception):
    """Training cannot go on (e.g. the loss stays non-finite); the last checkpoint is intact."""


class AlreadyFinished(Exception):
    """The run's latest checkpoint is at train.max_steps: nothing to train, no engine, no W&B run."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0
    adv_skipped: int = 0  # steps whose adversarial term was dropped (non-finite)
    bad_streak: int = 0  # consecutive steps with a non-finite loss
    vanish_streak: int = 0  # consecutive active steps whose adversarial term was numerically zero
    wandb_id: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; `key=value` overrides may come anywhere, before or after the options."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.pretrain", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints and W&B files go")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    return parser.parse_intermixed_args(argv)


def _quiet_libraries() -> None:
    """DeepSpeed's engine set-up INFO lines and torch's deprecation warning for the collective
    DeepSpeed calls would interleave with the progress lines on every rank; warnings stay."""
    import logging
    import warnings

    from deepspeed.utils import logger

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_libraries()
    try:
        train(args.config, Path(args.run_dir), args.overrides)
    except UserError as e:
        _report(f"pretrain: error: {e}", every_rank=not _distributed_ready())
        return 2
    except TrainingAborted as e:
        _report(f"pretrain: stopped: {e}")
        return 3
    except AlreadyFinished as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, flush=True)
    finally:
        shutdown_distributed()
    return 0


def _distributed_ready() -> bool:
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown_distributed() -> None:
    """Leave the process group before exit: tearing it down during interpreter shutdown can
    abort the process ("terminate called without an active exception") after a clean error."""
    import torch.distributed

    if _distributed_ready():
        torch.distributed.destroy_process_group()


@dataclass
class StartPoint:
    """The checkpoint a launch loads: its own run's latest complete one (a resume), or
    `checkpoint.init_from` (continual pretraining)."""

    run_dir: Path
    tag: str
    resume: bool
    world_size: int  # of the run that wrote it
    note: str | None = None


@dataclass
class Run:
    """Everything a launch sets up before its first step."""

    config: object
    run_dir: Path
    engine: object
    tokenizer: object
    dataset: object
    val: object
    masking: object
    start: StartPoint | None


def prepare(config_path: str | None, run_dir: Path, overrides: list[str], finished_ok: bool = False) -> Run:
    """Process group, config, data checks, model and DeepSpeed engine (no checkpoint loaded).
    A run already at train.max_steps raises AlreadyFinished first, unless `finished_ok` (a
    caller that wants the engine of a finished run, not more training)."""
    import deepspeed
    import deepspeed.comm as dist

    from data_prep.tokenizer_dir import load_tokenizer
    from pipeline.config import TrainConfig, missing_paths
    from pipeline.data import Masking, ShardDataset
    from pipeline.engine import deepspeed_config, make_optimizer, make_scheduler, zero_stage
    from pipeline.checkpoint import step_of as checkpoint_step
    from pipeline.model import MaskedLM, build_model, check_init_from, hf_config
    from pipeline.rundir import resolve_run_config, write_run_files

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
        tokenizer = load_tokenizer(config.data.tokenizer)
        dataset = ShardDataset(config.data.shards, config.data.train_split)
        _check_data(dataset, tokenizer, config)
        dataset.verify_checksums(rank, world_size)
        if config.eval.every_steps and config.data.val_split not in dataset.manifest["splits"]:
            raise UserError(f"{config.data.shards}: no {config.data.val_split!r} split to validate on (splits: {', '.join(dataset.manifest['splits'])}); "
                            "shard with `alum shard --val-fraction 0.01`, or set eval.every_steps=0 to train without validation")
        val = ShardDataset(config.data.shards, config.data.val_split) if config.eval.every_steps else None
        # A model to continue from brings its own architecture.
        if config.model.init_from:
            check_init_from(config.model.init_from)
        source = config.model.init_from or config.model.config
        model_config = hf_config(source, tokenizer.vocab_size, tokenizer.special_token_ids, dataset.seq_len)
        return config, tokenizer, dataset, val, model_config, deepspeed_config(config, world_size), _start_point(run_dir, config)

    config, tokenizer, dataset, val, model_config, ds_config, start = _on_every_rank(checks)
    if not finished_ok and start is not None and start.resume and checkpoint_step(start.tag) >= config.train.max_steps:
        raise AlreadyFinished(f"{run_dir}: already at train.max_steps={config.train.max_steps} ({start.tag}); "
                              "nothing to do (raise train.max_steps to continue)")
    _check_same_config(config)
    if start is not None and start.world_size != world_size and zero_stage(ds_config) > 0:
        # ZeRO's partitioned optimizer state only loads on the world size that wrote it.
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    _set_threads(config.train.threads_per_rank)
    torch.manual_seed(config.train.seed)
    model = MaskedLM(build_model(model_config, config.model.init_from, config.model.activation_checkpointing), config.adversarial.perturb_at)
    optimizer = make_optimizer(model, config.train, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, config.train), config=ds_config)
    if rank == 0:
        write_run_files(run_dir, config, model_config, tokenizer)
    dist.barrier()
    specials = tokenizer.special_token_ids
    masking = Masking(tuple(specials.values()), specials["mask"], specials["pad"], tokenizer.vocab_size)
    return Run(config, run_dir, engine, tokenizer, dataset, val, masking, start)


def _report(line: str, every_rank: bool = False) -> None:
    """Errors agreed by all ranks are printed once, by rank 0; a rank that never reached the
    others (no process group) can only speak for itself."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def train(config_path: str | None, run_dir: Path, overrides: list[str]) -> TrainState:
    from pipeline.metrics import MetricsLogger

    run = prepare(config_path, run_dir, overrides)
    rank = int(os.environ["RANK"])
    StopRequest.install(run.config.train.stop_signals)
    state = _resume(run, rank, int(os.environ["WORLD_SIZE"]))
    logger = MetricsLogger(run_dir, rank == 0, state.step, run.config.wandb, state.wandb_id, _config_dict(run.config))
    state.wandb_id = logger.wandb_id
    try:
        _loop(run, state, logger)
    finally:
        logger.close()
    return state


def _loop(run: Run, state: TrainState, logger) -> None:
    import deepspeed.comm as dist

    from pipeline import checkpoint, vanishing
    from pipeline.data import step_batches
    from pipeline.evaluate import evaluate
    from pipeline.sampling import epoch_fraction, sample_digest

    engine, config, dataset, run_dir = run.engine, run.config, run.dataset, run.run_dir
    rank, world_size = dist.get_rank(), dist.get_world_size()
    train = config.train
    device = engine.device
    step_start = time.perf_counter()
    while state.step < train.max_steps:
        rate = config.masking.schedule.rate(epoch_fraction(state.consumed_samples, len(dataset)))
        global_indices, batches = step_batches(
            dataset, state.consumed_samples, train.global_batch_size, train.micro_batch_size,
            rank, world_size, train.seed, state.step, rate, run.masking,
        )
        sums = _train_step(engine, batches, config, state.step, device)
        sums["stop"] = float(StopRequest.signal_name is not None)
        state.step += 1
        state.consumed_samples += train.global_batch_size
        stats = _all_reduce_sum(sums, device)
        nonfinite = stats["nonfinite"] > 0
        state.adv_skipped += int(stats["adv_skipped"] > 0)
        state.bad_streak = state.bad_streak + 1 if nonfinite else 0
        if nonfinite and engine.was_step_applied():
            raise TrainingAborted(f"step {state.step}: non-finite loss and this configuration (ZeRO stage 0, fp32) cannot skip the update")
        adv = config.adversarial
        adv_active = adv.active(state.step - 1)
        adv_ratio = adv.alpha * stats["loss_adv"] / stats["loss_mlm"] if stats["loss_mlm"] > 0 else 0.0
        delta_lost = stats["delta_lost"] / stats["micro_batches"]
        if adv_active:
            counts = stats["adv_skipped"] == 0 and vanishing.vanished(adv, adv_ratio, delta_lost)
            state.vanish_streak = state.vanish_streak + 1 if counts else 0

        evaluate_now = run.val is not None and state.step % config.eval.every_steps == 0
        if evaluate_now or state.step % train.log_every == 0 or state.step == train.max_steps:
            elapsed = time.perf_counter() - step_start
            micro = stats["micro_batches"]
            record = {
                "train/loss": stats["loss"] / micro,
                "train/loss_mlm": stats["loss_mlm"] / micro,
                "train/loss_adv": stats["loss_adv"] / micro,
                "train/mask_rate": rate,
                "train/lr": engine.get_lr()[0],
                "train/grad_norm": _grad_norm(engine),
                "train/adv_active": int(adv_active),
                "train/adv_skipped": state.adv_skipped,
                "train/delta_norm": stats["delta_norm"] / micro,
                "train/adv_grad_norm": stats["adv_grad_norm"] / micro,
                "train/adv_ratio": adv_ratio,
                "train/delta_lost": delta_lost,
                "train/nonfinite_steps": state.bad_streak,
                "perf/tokens_per_s": train.global_batch_size * dataset.seq_len / max(elapsed, 1e-9),
                "perf/step_seconds": elapsed,
                "data/consumed_samples": state.consumed_samples,
                "data/epoch": state.consumed_samples // len(dataset),
                "data/sample_digest": sample_digest(global_indices),
            }
            if record["train/adv_grad_norm"] > 0:
                # Its size is often 1e-8 or less, which W&B's summary and tables print as 0.0.
                record["train/adv_grad_norm_log10"] = math.log10(record["train/adv_grad_norm"])
            if evaluate_now:
                record.update(evaluate(engine, run.val, config, run.masking))
            logger.log(state.step, record)
            if rank == 0:
                print(_progress_line(state.step, train.max_steps, record), flush=True)
        vanishing.check(adv, state.vanish_streak, state.step, adv_ratio, delta_lost, _report)
        if state.bad_streak > train.max_bad_steps:
            last, _ = checkpoint.latest_complete(run_dir)
            raise TrainingAborted(
                f"step {state.step}: non-finite loss for {state.bad_streak} steps in a row (train.max_bad_steps={train.max_bad_steps}); "
                f"the last good checkpoint is {last or 'none'}"
            )
        stop = stats["stop"] > 0
        if state.bad_streak == 0 and (stop or state.step % config.checkpoint.every_steps == 0 or state.step == train.max_steps):
            checkpoint.save(engine, run_dir, state.step, _client_state(state, world_size), config.checkpoint.keep_last)
        if stop:
            if rank == 0:
                print(f"stop requested ({StopRequest.signal_name or 'by another rank'}): saved step {state.step}; re-run the same command to continue", flush=True)
            return
        step_start = time.perf_counter()


def _progress_line(step: int, max_steps: int, record: dict) -> str:
    line = (
        f"step {step}/{max_steps} | loss {record['train/loss']:.4f} (mlm {record['train/loss_mlm']:.4f}, "
        f"adv {record['train/loss_adv']:.2e}) | mask {record['train/mask_rate']:.0%} | lr {record['train/lr']:.2e} | "
        f"{record['perf/tokens_per_s']:,.0f} tok/s"
    )
    if "eval/loss" in record:
        line += f" | eval ppl {record['eval/ppl']:.1f} acc {record['eval/accuracy']:.3f} (commonest token {record['eval/commonest_token_accuracy']:.3f})"
    return line


def _train_step(engine, batches, config, step: int, device) -> dict:
    """Forward, backward and update for each micro-batch; the summed stats stay on the device."""
    from pipeline.adversarial import STATS, compute_losses

    sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    for batch in batches:
        ids, mask, positions, labels = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.positions, batch.labels))

        def forward(delta):
            return engine(ids, mask, positions, delta)

        def ascent_forward(delta):
            return engine.module(ids, mask, positions, delta)[0]

        out = compute_losses(forward, ascent_forward, labels, config.adversarial, step, real=mask)
        engine.backward(out.loss)
        engine.step()
        sums += out.stats()
    return dict(zip(STATS, sums))


def _all_reduce_sum(values: dict, device) -> dict:
    """Sum per-rank numbers (floats or 0-dim tensors) over all ranks: one host sync per step.
    NaN-safe: non-finite losses stay visible."""
    import deepspeed.comm as dist

    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values.values()])
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _client_state(state: TrainState, world_size: int) -> dict:
    return {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "adv_skipped": state.adv_skipped,
        "vanish_streak": state.vanish_streak,
        "wandb_id": state.wandb_id,
        "world_size": world_size,
    }


def _start_point(run_dir: Path, config) -> StartPoint | None:
    from pipeline import checkpoint

    tag, note = checkpoint.latest_complete(run_dir)
    if tag is not None:
        return StartPoint(run_dir, tag, True, checkpoint.saved_world_size(run_dir, tag), note)
    if config.checkpoint.init_from is None:
        return None
    source_dir, source_tag = _checkpoint_source(Path(config.checkpoint.init_from))
    return StartPoint(source_dir, source_tag, False, checkpoint.saved_world_size(source_dir, source_tag))


def _resume(run: Run, rank: int, world_size: int) -> TrainState:
    """Load the start point into the engine and set up each rank's dropout stream."""
    from pipeline import checkpoint

    start, config, engine = run.start, run.config, run.engine
    if rank == 0:
        for name in checkpoint.remove_partial(run.run_dir, start.tag if start and start.resume else None):
            print(f"removed partial checkpoint {run.run_dir / checkpoint.CHECKPOINTS / name} (no {checkpoint.COMPLETE}: "
                  "the job stopped while saving it)", flush=True)
    if start is None:
        torch.manual_seed(config.train.seed * 1000 + rank + 1)  # per-rank dropout streams
        return TrainState()
    source = start.run_dir / checkpoint.CHECKPOINTS / start.tag
    if rank == 0 and start.note:
        print(start.note, flush=True)
    if engine.load_universal_checkpoint() and checkpoint.make_universal(start.run_dir, start.tag) and rank == 0:
        print(f"converted {source} (written by {start.world_size} ranks) to a universal checkpoint for {world_size} ranks", flush=True)
    load_optimizer = start.resume or config.checkpoint.init_optimizer
    client = checkpoint.load(engine, start.run_dir, start.tag, load_optimizer=load_optimizer)
    if not start.resume:
        torch.manual_seed(config.train.seed * 1000 + rank + 1)
        if rank == 0:
            print(f"initialised from {source}", flush=True)
        if not load_optimizer:
            return TrainState()
        return TrainState(client["step"], client["consumed_samples"], client["adv_skipped"])
    if start.world_size == world_size:
        checkpoint.restore_rng(start.run_dir, start.tag)
    else:
        # The ranks hold other samples than before, so their dropout streams cannot go on;
        # new ones from (seed, rank, step) keep this launch deterministic.
        torch.manual_seed((config.train.seed * 1000 + rank + 1) * 1_000_003 + client["step"])
    if rank == 0:
        print(f"resumed from {source} (step {client['step']})", flush=True)
    return TrainState(client["step"], client["consumed_samples"], client["adv_skipped"], 0, client.get("vanish_streak", 0), client.get("wandb_id"))


def _checkpoint_source(path: Path) -> tuple[Path, str]:
    """A run directory (its latest complete checkpoint) or one of its checkpoint tags."""
    from pipeline import checkpoint

    if checkpoint.is_complete(path):
        return path.parent.parent, path.name
    tag, _ = checkpoint.latest_complete(path)
    if tag is None:
        raise UserError(f"checkpoint.init_from: {path}: no complete checkpoint in this run directory")
    return path, tag


def _on_every_rank(check):
    """Run `check` on every rank; if any rank finds a bad input, every rank raises it.

    Some checks are rank-local (each rank hashes its share of the shards): without this a
    failing rank would exit while the others wait for it in a collective until timeout.
    """
    import torch.distributed

    result, error = None, None
    try:
        result = check()
    except UserError as e:
        error = str(e)
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)
    return result


def _check_data(dataset, tokenizer, config) -> None:
    fingerprint = dataset.manifest["tokenizer"]["sha256"]
    if fingerprint != tokenizer.sha256:
        raise UserError(
            f"{config.data.shards}: shards were built with another tokenizer (sha256 {fingerprint[:12]}) "
            f"than data.tokenizer {config.data.tokenizer} ({tokenizer.sha256[:12]})"
        )


def _config_dict(config) -> dict:
    from pipeline.config import to_dict

    return to_dict(config)


def init_distributed(timeout_s: float) -> tuple[int, int]:
    """Join (or, started alone, create) the process group on the accelerator's backend."""
    import deepspeed
    import deepspeed.comm as dist
    import torch.distributed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=datetime.timedelta(seconds=timeout_s))
    except torch.distributed.DistError as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise UserError(
            f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: no rendezvous at {where} within {timeout_s:g} s "
            f"(train.dist_timeout_s): are all nodes started, and is MASTER_ADDR/MASTER_PORT the rank-0 node? ({str(e).splitlines()[0]})"
        ) from None
    _release_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def _release_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm file per rank and never deletes it,
    so every launch on a CPU machine would leave them behind, in RAM, even after a clean
    exit. Once all ranks have passed a barrier, each has mapped every buffer and the
    names are no longer needed."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def _check_same_config(config) -> None:
    """Every rank must run the same resolved config: nodes launched with different files or
    overrides would otherwise train a silently inconsistent model."""
    import torch.distributed

    from pipeline.config import flatten, to_dict

    mine = flatten(to_dict(config))
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    for rank, other in enumerate(every):
        differing = sorted(key for key in every[0].keys() | other.keys() if every[0].get(key) != other.get(key))
        if differing:
            key = differing[0]
            raise UserError(
                f"rank {rank} was started with another config than rank 0: {key}={other.get(key)!r} there, "
                f"{every[0].get(key)!r} on rank 0; launch every node with the same config and overrides"
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_threads(threads_per_rank: int) -> None:
    """Split the cores among the ranks of this node so they do not oversubscribe them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
