"""The first DeepSpeed launch on a CPU machine compiles a communication op for minutes: the
launch says so before it starts, and only then (the compiled module is looked up where torch's
extension loader keeps it)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

ANNOUNCE = """
from deepspeed.accelerator import get_accelerator
from pipeline.train.distributed import _announce_op_build, built_extension
print(built_extension("deepspeed_shm_comm"))
_announce_op_build(get_accelerator())
"""


def announce(extensions) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(extensions), "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "-c", ANNOUNCE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if not line.startswith("[")]  # DeepSpeed's own log lines


def test_the_op_build_is_announced_only_while_the_op_is_not_built(tmp_path):
    path, *said = announce(tmp_path)
    assert path == str(tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so")
    assert said == ["building DeepSpeed's CPU communication op: once per machine and environment, a few minutes"]
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")  # as a finished build leaves it
    assert announce(tmp_path)[1:] == []
