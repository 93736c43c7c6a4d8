"""metrics.jsonl on resume: cut back to the checkpoint's step, surviving a torn last line."""

from __future__ import annotations

import json

from pipeline.config import WandbConfig
from pipeline.metrics import METRICS, MetricsLogger


def test_resume_cuts_the_log_back_and_drops_a_line_torn_by_a_kill(tmp_path):
    lines = [json.dumps({"step": step, "train/loss": 7.0 - step}) for step in range(1, 7)]
    (tmp_path / METRICS).write_text("\n".join(lines) + "\n" + '{"step": 7, "train/lo')  # killed mid-write
    logger = MetricsLogger(tmp_path, True, 4, WandbConfig(mode="disabled"), None, {})
    logger.log(5, {"train/loss": 1.5})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["train/loss"] == 3.0 and records[4]["train/loss"] == 1.5
