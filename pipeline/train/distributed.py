"""The process group: joining it, agreeing across ranks, and leaving it cleanly.

Training and DeepSpeed fine-tuning run the same way under `deepspeed`, `torchrun` or alone
(a world of one). Errors found on one rank are raised on every rank, so no rank waits for
a failed one in a collective until the timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch
import torch.distributed
from deepspeed.accelerator import get_accelerator

from data_prep.cores import usable_cores
from data_prep.differences import first_difference
from data_prep.errors import UserError

_joined = False  # this process has been in a process group (see exit_process)


def init_distributed(timeout_s: float) -> tuple[int, int]:
    """Join (or, started alone, create) the process group on the accelerator's backend."""
    global _joined
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        # Object collectives (on_every_rank, check_same_config, resume's broadcast) run before
        # deepspeed.initialize and put their tensors on the *current* device, which
        # init_process_group does not set: without this every rank would use device 0.
        if "LOCAL_RANK" not in os.environ:
            raise UserError(
                f"rank {os.environ['RANK']}: RANK is set but LOCAL_RANK is not, so the GPU of this process is unknown; "
                "start the ranks with deepspeed or torchrun, which set both"
            )
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    _announce_op_build(accelerator)
    try:
        with _without_built_notice():
            deepspeed.init_distributed(
                dist_backend=accelerator.communication_backend_name(), timeout=datetime.timedelta(seconds=timeout_s)
            )
    except torch.distributed.DistError as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise UserError(
            f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: no rendezvous at {where} within {timeout_s:g} s "
            "(train.dist_timeout_s): are all nodes started, and is MASTER_ADDR/MASTER_PORT the rank-0 node? "
            f"({str(e).splitlines()[0]})"
        ) from None
    _joined = True
    _release_shm_buffer(accelerator.device_name())
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _announce_op_build(accelerator) -> None:
    """On a CPU, DeepSpeed compiles its shared-memory all-reduce op the first time a machine
    (a user's cache, a Python environment) joins a process group: minutes of silence (about
    140 s on 2 cores) otherwise. Said once per node, by its local rank 0, before it starts."""
    if accelerator.device_name() != "cpu" or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None and not built_extension(builder.NAME).is_file():
        print("building DeepSpeed's CPU communication op: once per machine and environment, a few minutes", flush=True)


@contextlib.contextmanager
def _without_built_notice():
    """DeepSpeed prints "DeepSpeed ... built successfully" from every rank of every launch on a
    CPU, whether it compiled anything or loaded the cached op; everything else printed passes."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [
            line
            for line in captured.getvalue().splitlines(keepends=True)
            if not line.rstrip().endswith("built successfully")
        ]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


def built_extension(name: str) -> Path:
    """Where torch's extension loader keeps the compiled module `name` (TORCH_EXTENSIONS_DIR, else the user's cache)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / f"{name}.so"


def distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown_distributed() -> None:
    """Leave the process group before exit: tearing it down during interpreter shutdown can
    abort the process ("terminate called without an active exception") after a clean error."""
    if distributed_ready():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a training process with `code`. One that has been in a process group skips the
    interpreter's teardown (os._exit once its output is flushed; files and the W&B run are
    closed by then): gloo's native threads, destroyed there in an order Python does not
    control, now and then abort a rank that had already left the group cleanly ("terminate
    called without an active exception", exit -6; 1 in 13 two-node launches that stop on a
    config mismatch)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _joined:
        os._exit(code)
    sys.exit(code)


def _release_shm_buffer(device_name: str) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm file per rank and never deletes it,
    so every launch on a CPU machine would leave them behind, in RAM, even after a clean
    exit. Once all ranks have passed a barrier, each has mapped every buffer and the
    names are no longer needed."""
    if device_name != "cpu":
        return
    torch.distributed.barrier()
    address = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{torch.distributed.get_rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def on_every_rank(check):
    """Run `check` on every rank; if any rank finds a bad input, every rank raises it.

    Some checks are rank-local (each rank hashes its share of the shards): without this a
    failing rank would exit while the others wait for it in a collective until timeout.
    """
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


def check_same_config(flat: dict) -> None:
    """Every rank must run the same resolved config (`flat`: key path -> value): nodes
    launched with different files or overrides would otherwise train a silently
    inconsistent model."""
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, flat)
    for rank, other in enumerate(every):
        difference = first_difference(every[0], other)
        if difference:
            key, ours, theirs = difference
            raise UserError(
                f"rank {rank} was started with another config than rank 0: {key}={theirs!r} there, "
                f"{ours!r} on rank 0; launch every node with the same config and overrides"
            )


def report(line: str, every_rank: bool = False) -> None:
    """Errors agreed by all ranks are printed once, by rank 0; a rank that never reached the
    others (no process group) can only speak for itself."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_threads(threads_per_rank: int) -> None:
    """Split the cores this job was given (its CPU affinity: SLURM binds a job to its share, and
    os.cpu_count() would count the whole machine) among the ranks of this node so they do not
    oversubscribe them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    threads = threads_per_rank or max(1, usable_cores() // local)
    torch.set_num_threads(threads)
