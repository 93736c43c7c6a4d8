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
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("gpu_check:")]
    assert lines[0] == "gpu_check: no CUDA device: the CPU path"
    assert re.fullmatch(
        r"gpu_check: tiny model, bf16 ALUM: 4 ALUM steps, loss_adv from \S+ to \S+, guard silent: OK", lines[1]
    )
    assert re.fullmatch(
        r"gpu_check: SMART, bf16 student = teacher on cpu: proximal term 0 \(a float32 teacher: \S+\): OK", lines[2]
    )
    assert float(lines[2].split("float32 teacher: ")[1].split(")")[0]) != 0  # the check can tell the two apart
    assert lines[3] == "gpu_check: tiny model, fp16 ALUM: skipped (no CUDA; a CPU has no fp16)"
    assert re.fullmatch(
        r"gpu_check: alum finetune --deepspeed, 6 steps: dev accuracy \S+, saved weights float32: OK", lines[4]
    )
    assert lines[5] == "gpu_check: bert-base: skipped (no CUDA); the timing below is the tiny bf16 run's"
    timing = re.fullmatch(
        r"gpu_check: hidden 64 x 2 layers, batch 16 x 128: standard (\S+) s/step \((\S+) tok/s\); "
        r"ALUM (\S+) s/step \((\S+) tok/s\); ALUM/standard step time (\S+)",
        lines[6],
    )
    assert timing, lines[6]
    standard, alum, ratio = float(timing[1]), float(timing[3]), float(timing[5])
    assert ratio == pytest.approx(
        alum / standard, rel=0.02
    )  # printed rounded (no claim on its size: tests assert no timings)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "corpus.jsonl",
        "export.log",
        "finetune",
        "finetune.log",
        "shards",
        "smart.json",
        "smart.log",
        "task",
        "tiny-bf16",
        "tiny-bf16.log",
        "tiny-hf",
        "tokenizer",
    ]
