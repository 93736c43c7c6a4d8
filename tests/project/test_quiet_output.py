"""What the commands print is what a user needs: `--help` says nothing of DeepSpeed (which
logs its accelerator choice when imported), and a training run's own lines are counted in
tests/integration/test_stop.py, where a real 2-rank launch runs."""

from __future__ import annotations

import pytest
from helpers import run_python


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "pipeline.pretrain"],
        ["-m", "pipeline.cli", "pretrain"],
        ["-m", "pipeline.finetune"],
        ["-m", "pipeline.cli", "finetune"],
    ],
    ids=["python -m pipeline.pretrain", "alum pretrain", "python -m pipeline.finetune", "alum finetune"],
)
def test_help_is_only_the_usage(command):
    result = run_python(*command, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: "), result.stdout[:300]
