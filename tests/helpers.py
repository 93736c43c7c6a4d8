"""Plain helpers the tests share: launching the CLI and training, a small filesystem that
fills up, reading a run's metrics and W&B records, and the tiny run's settings (bench/tiny_run.py, which the bench
scripts use too).
Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_prep import manifest

REPO = Path(__file__).resolve().parents[1]
SUPPORT = REPO / "tests" / "support"  # what launched processes run (modules, sitecustomize.py)
DATA = Path(os.environ.get("ALUM_SHARED_DATA", ""))
# The tiny run is shared with bench/fault_injection.py, whose modules the tests import; the
# support scripts that launched processes run are imported by tests too (host_syncs, published).
sys.path += [str(REPO / "bench"), str(SUPPORT)]

# The tests import these from here too: RUN, build_shards, build_tokenizer, comparable, pretrain_args.
from tiny_run import (  # noqa: E402,F401
    CONFIG,
    RUN,
    build_shards,
    build_tokenizer,
    comparable,
    launch_command,
    pretrain_args,
)


def data_file(relative: str) -> Path:
    """A file of the test data; a missing one is a broken set-up, so fail rather than skip."""
    if not os.environ.get("ALUM_SHARED_DATA"):
        pytest.fail("ALUM_SHARED_DATA is not set: set it to the test-data directory (wikitext-2/, sst2/, ...)")
    path = DATA / relative
    if not path.is_file():
        pytest.fail(f"{path}: test data is missing (ALUM_SHARED_DATA={DATA})")
    return path


def run_python(*args: str, cwd: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh interpreter that imports this checkout, output captured."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )


def run_alum(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the `alum` CLI in a fresh interpreter, as a user would."""
    result = run_python("-m", "pipeline.cli", *args, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"alum {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def pretrain(
    run_dir: Path,
    shards: Path,
    tokenizer: Path | None,
    *overrides: str,
    world: int = 2,
    stage: int = 2,
    launcher: str | None = None,
    config: str = CONFIG,
    timeout: int = 600,
    start=subprocess.run,
    python_path: tuple[Path, ...] = (),
    **kwargs,
):
    """Launch training the way users do: `deepspeed` (default for several ranks), `torchrun`,
    `python -m pipeline.pretrain` (default for one) or `alum pretrain`. No tokenizer: the
    run's default (model.init_from's). `python_path`: folders put first on the processes'
    PYTHONPATH (a fault injected through a sitecustomize.py)."""
    from pipeline.train.distributed import free_port  # imports DeepSpeed: only the tests that launch pay for it

    command = launch_command(launcher or ("deepspeed" if world > 1 else "python"), world, free_port()) + pretrain_args(
        run_dir, shards, tokenizer, *overrides, stage=stage, config=config
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, (*python_path, REPO, SUPPORT))),
        "WANDB_SILENT": "true",
    }
    if start is subprocess.run:
        # Its own session, so a launch that times out is killed whole (launcher, ranks, W&B).
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **kwargs,
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        return subprocess.CompletedProcess(command, process.returncode, out, err)
    return start(command, cwd=REPO, env=env, **kwargs)


def pretrain_several(
    runs: list[tuple[Path, tuple[str, ...]]],
    shards: Path,
    tokenizer: Path,
    world: int = 2,
    stage: int = 2,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """Several runs (run dir, overrides), one after another in one launch (tests/support/several_runs.py)."""
    from pipeline.train.distributed import free_port

    command = launch_command("deepspeed", world, free_port(), module="several_runs")
    for i, (run_dir, overrides) in enumerate(runs):
        command += [*(["--next"] if i else []), *pretrain_args(run_dir, shards, tokenizer, *overrides, stage=stage)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (REPO, SUPPORT))), "WANDB_SILENT": "true"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


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


class SmallDisk:
    """A tmpfs of a set size at `path`: a real filesystem that fills up, for the full-disk
    tests (the `small_disk` fixture unmounts it). Mounting needs root, or CAP_SYS_ADMIN in a
    container; where it is not allowed, the test is skipped and says why."""

    def __init__(self, path: Path):
        self.path, self.mounted = path, False

    def mount(self, size: int) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({result.stderr.strip()}): a full disk needs a small real filesystem"
            )
        self.mounted = True
        return self.path

    def resize(self, size: int) -> None:
        """More room (or less, down to what is in use), as freeing space on a full disk gives."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def used(self) -> int:
        return shutil.disk_usage(self.path).used

    def unmount(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(
                ["umount", "--lazy", str(self.path)], check=True
            )  # busy: detached now, freed when the last user exits
        self.mounted = False


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under a directory, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def refused_in_one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command exited 2 with a single error line, which contains every fragment (a
    library's warning may come before it: DeepSpeed names the accelerator it picked)."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def raises_naming(key: str):
    """pytest.raises for a UserError whose message names `key`."""
    from data_prep.errors import UserError

    return pytest.raises(UserError, match=re.escape(key))


MINIMAL = {"data": {"shards": "data/shards", "tokenizer": "data/tokenizer"}}


def minimal(tmp_path: Path, **sections) -> Path:
    """A run config with the two required data keys plus the given sections."""
    return write_yaml(tmp_path / "run.yaml", {**MINIMAL, **sections})


def checkpoint_logits(run_dir: Path, tag: str, out: Path) -> dict:
    """The training engine's masked-position logits at checkpoint `tag` ("start": the weights
    training starts from), from 2 ranks under the DeepSpeed launcher (tests/support/checkpoint_logits.py)."""
    import torch

    from pipeline.train.distributed import free_port  # imports DeepSpeed: only the tests that launch pay for it

    command = launch_command("deepspeed", 2, free_port(), module="checkpoint_logits")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{SUPPORT}"}
    ok(
        subprocess.run(
            [*command, str(run_dir), tag, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
    )
    return torch.load(out)


def shard_rows(directory: Path, split: str = "train") -> np.ndarray:
    """Every row of a shard split, read straight from its Arrow files (not through the pipeline's reader)."""
    data = manifest.read(directory)
    blocks = []
    for entry in data["splits"][split]["shards"]:
        with pa.memory_map(str(directory / entry["path"])) as source:
            table = pa.ipc.open_stream(source).read_all()
        blocks.append(np.asarray(table.column("input_ids").combine_chunks().values).reshape(-1, data["seq_len"]))
    return np.concatenate(blocks)
