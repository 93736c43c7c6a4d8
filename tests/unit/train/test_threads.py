"""Torch threads per rank: the CPUs the job was given (its affinity), split among the node's ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

# As SLURM's CPU binding or `taskset -c` start a job: bound to one CPU of a machine with more.
ONE_CPU = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import torch
from pipeline.train.distributed import set_threads
set_threads(0)
print(torch.get_num_threads())
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs CPU affinity and 2 CPUs"
)
def test_a_rank_bound_to_one_cpu_runs_one_thread():
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_SIZE", "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=str(REPO), LOCAL_WORLD_SIZE="1")
    result = subprocess.run([sys.executable, "-c", ONE_CPU], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1"
