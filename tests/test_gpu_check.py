"""bench/gpu_check.sh, on the CPU path: the script a GPU session runs first must work before it gets there."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_its_checks_on_a_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "work")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("gpu_check:")]
    assert lines[0] == "gpu_check: no CUDA device: the CPU path"
    assert re.fullmatch(r"gpu_check: tiny model, bf16 ALUM: 4 ALUM steps, loss_adv from \S+ to \S+, guard silent: OK", lines[1])
    timing = re.fullmatch(r"gpu_check: hidden 64 x 2 layers, batch 16 x 128: standard (\S+) s/step \((\S+) tok/s\); "
                          r"ALUM (\S+) s/step \((\S+) tok/s\); ALUM/standard step time (\S+)", lines[2])
    assert timing, lines[2]
    standard, alum, ratio = float(timing[1]), float(timing[3]), float(timing[5])
    assert ratio == pytest.approx(alum / standard, rel=0.02) and ratio > 1  # printed rounded; an ALUM step does more passes
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["corpus.jsonl", "shards", "tiny-bf16", "tiny-bf16.log", "tokenizer"]
