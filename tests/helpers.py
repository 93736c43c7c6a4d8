"""Plain helpers and settings the tests share: launching the CLI and training, reading a run's
metrics and W&B records. Fixtures live in conftest.py, which pytest loads by itself."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ALUM_SHARED_DATA", ""))

# A few seconds per launch on 2 CPU cores: tiny BERT, 64-token rows, 16 samples a step.
TRAIN_OVERRIDES = (
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.warmup_steps=2",
    "eval.batches=2",
    "wandb.mode=offline",
    "adversarial.grad_eps=1e-12",
    "train.dist_timeout_s=300",  # a test that hangs on a collective fails in minutes
)

# A perturbation large enough that the adversarial term is well above float32 rounding of the loss.
RUN = ("train.max_steps=8", "adversarial.method=alum", "adversarial.start_step=4", "adversarial.step_size=0.1",
       "adversarial.noise_std=0.01", "checkpoint.every_steps=4", "eval.every_steps=4",
       "train.peak_tflops=0.5")  # a CPU has no known peak: this one logs perf/mfu


def data_file(relative: str) -> Path:
    """A file of the test data; a missing one is a broken set-up, so fail rather than skip."""
    if not os.environ.get("ALUM_SHARED_DATA"):
        pytest.fail("ALUM_SHARED_DATA is not set: set it to the test-data directory (wikitext-2/, sst2/, ...)")
    path = DATA / relative
    if not path.is_file():
        pytest.fail(f"{path}: test data is missing (ALUM_SHARED_DATA={DATA})")
    return path


def run_alum(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the `alum` CLI in a fresh interpreter, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"alum {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def pretrain(run_dir: Path, shards: Path, tokenizer: Path | None, *overrides: str, world: int = 2, stage: int = 2,
             launcher: str | None = None, config: str = "configs/tiny.yaml", timeout: int = 600, start=subprocess.run,
             python_path: tuple[Path, ...] = (), **kwargs):
    """Launch training the way users do: `deepspeed` (default for several ranks), `torchrun`,
    `python -m pipeline.pretrain` (default for one) or `alum pretrain`. No tokenizer: the
    run's default (model.init_from's). `python_path`: folders put first on the processes'
    PYTHONPATH (a fault injected through a sitecustomize.py)."""
    from pipeline.distributed import free_port  # imports DeepSpeed: only the tests that launch pay for it

    args = ["--config", config, "--run-dir", str(run_dir), f"data.shards={shards}",
            *([f"data.tokenizer={tokenizer}"] if tokenizer else []),
            f"deepspeed=configs/deepspeed/zero{stage}.json", *TRAIN_OVERRIDES, *overrides]
    launcher = launcher or ("deepspeed" if world > 1 else "python")
    commands = {
        "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()), "--module", "pipeline.pretrain"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port()), "-m", "pipeline.pretrain"],
        "python": [sys.executable, "-m", "pipeline.pretrain"],
        "alum": [sys.executable, "-m", "pipeline.cli", "pretrain"],
    }
    command = commands[launcher] + args
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (*python_path, REPO, REPO / "tests"))), "WANDB_SILENT": "true"}
    if start is subprocess.run:
        # Its own session, so a launch that times out is killed whole (launcher, ranks, W&B).
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True, **kwargs)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        return subprocess.CompletedProcess(command, process.returncode, out, err)
    return start(command, cwd=REPO, env=env, **kwargs)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def kill_when(path: Path, process: subprocess.Popen, timeout: float = 300, poll: float = 0.02) -> None:
    """SIGKILL a launch (started with start_new_session=True) as soon as `path` exists."""
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert path.exists(), f"{path} never appeared"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock figures."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of the W&B offline run(s) in a run directory, in file order.

    The `.wandb` file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of records, each with a 7-byte header (crc32, length, type: full, first,
    middle, last); a block tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2  # W&B is slow to import: only the tests that read its records pay for it

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path}: not a W&B run file"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:
                break
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
    return records


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """What `wandb.log` recorded, by step (keys with a "/" are stored as nested keys)."""
    rows = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row["_step"]] = row
    return rows
