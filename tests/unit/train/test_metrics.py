"""metrics.jsonl on resume (cut back to the checkpoint's step, surviving a torn last line),
and the W&B run when the W&B server cannot be reached."""

from __future__ import annotations

import json

import pytest

from data_prep.errors import UserError
from pipeline.train.config import RunConfig, WandbConfig
from pipeline.train.metrics import METRICS, MetricsLogger
from pipeline.train.resume import TrainState


def test_resume_cuts_the_log_back_and_drops_a_line_torn_by_a_kill(tmp_path):
    lines = [json.dumps({"step": step, "train/loss": 7.0 - step}) for step in range(1, 7)]
    (tmp_path / METRICS).write_text("\n".join(lines) + "\n" + '{"step": 7, "train/lo')  # killed mid-write
    logger = MetricsLogger(tmp_path, RunConfig(wandb=WandbConfig(mode="disabled")), TrainState(step=4), enabled=True)
    logger.log(5, {"train/loss": 1.5})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["train/loss"] == 3.0 and records[4]["train/loss"] == 1.5


@pytest.fixture
def unreachable_wandb(monkeypatch):
    """A W&B API key and a server address where nothing listens, as on a compute node without internet."""
    from pipeline.train.distributed import free_port

    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.slow  # W&B takes about 12 s to give up on the server
def test_an_unreachable_wandb_server_falls_back_to_offline_logging_under_the_same_run(
    tmp_path, unreachable_wandb, capsys
):
    settings = WandbConfig(mode="online", init_timeout_s=2, fallback="offline")
    logger = MetricsLogger(tmp_path, RunConfig(wandb=settings), TrainState(wandb_id="keepthis1"), enabled=True)
    logger.log(1, {"train/loss": 2.5})
    logger.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wandb: no W&B server")]
    assert warnings == [
        f"wandb: no W&B server within 2 s ({warnings[0].split('(', 1)[1].split(')')[0]}); logging offline as run "
        f"keepthis1: `wandb sync {tmp_path / 'wandb'}/offline-run-*` uploads it later"
    ]
    assert logger.wandb_id == "keepthis1"
    assert [p.name.rsplit("-", 1)[1] for p in (tmp_path / "wandb").glob("offline-run-*")] == ["keepthis1"]


@pytest.mark.slow
def test_an_unreachable_wandb_server_stops_the_run_when_asked_to(tmp_path, unreachable_wandb):
    settings = WandbConfig(mode="online", init_timeout_s=2, fallback="error")
    with pytest.raises(
        UserError, match=r"^wandb: no W&B server within wandb.init_timeout_s=2 s \(.*\); set wandb.mode=offline"
    ):
        MetricsLogger(tmp_path, RunConfig(wandb=settings), TrainState(), enabled=True)
    assert not list((tmp_path / "wandb").glob("offline-run-*"))
