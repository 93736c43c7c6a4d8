"""Resume on another number of ranks: ZeRO 1-3 checkpoints through DeepSpeed's universal format.

The model here has no dropout, so a run's numbers do not depend on how many ranks compute
them (up to float summation order): a run that changes world size at its step-4
checkpoint must then continue as the run that never changed, closely rather than roughly.

ZeRO-1 and ZeRO-2 are one optimizer class in DeepSpeed (stage_1_and_2.py), loaded from a
universal checkpoint by the same code: stage 2 stands for both. The stage-2 run trains with
SMART, whose EMA teacher travels in the checkpoint's client state; its proximal term is
weighted up (mu 1000, momentum 0.9) so that a teacher lost on the way would show in the loss.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import REPO, RUN, ok, pretrain, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-no-dropout.yaml"
    path.write_text((REPO / "configs/models/tiny.yaml").read_text().replace("dropout_prob: 0.1", "dropout_prob: 0.0"))
    return path


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_fewer_and_on_more_ranks(stage, tmp_path, train_shards, bert_tokenizer, no_dropout):
    method = (
        ("adversarial.method=smart", "adversarial.mu=1000", "adversarial.teacher_momentum=0.9") if stage == 2 else ()
    )

    def launch(run_dir: Path, world: int, *overrides: str):
        return pretrain(
            run_dir,
            train_shards,
            bert_tokenizer,
            *RUN,
            f"model.config={no_dropout}",
            *method,
            *overrides,
            stage=stage,
            world=world,
        )

    two = tmp_path / "two-ranks"
    ok(launch(two, 2))
    reference = read_metrics(two)

    # 2 -> 1: the two-rank run's step-4 checkpoint, continued on one rank (saving at 6 and 8).
    fewer = tmp_path / "two-then-one"
    shutil.copytree(two, fewer)
    shutil.rmtree(fewer / "checkpoints" / "step00000008")
    (fewer / "checkpoints" / "latest").write_text("step00000004")
    out = ok(launch(fewer, 1, "checkpoint.every_steps=2", "checkpoint.keep_last=3")).stdout
    assert "(written by 2 ranks) to a universal checkpoint for 1 ranks" in out
    assert f"resumed from {fewer / 'checkpoints' / 'step00000004'} (step 4)" in out
    assert (fewer / "checkpoints" / "step00000004" / "universal" / "complete.json").is_file()
    assert_continues(read_metrics(fewer), reference)

    # 1 -> 2: the one-rank run's step-6 checkpoint, continued on two ranks.
    more = tmp_path / "one-then-two"
    shutil.copytree(fewer, more)
    shutil.rmtree(more / "checkpoints" / "step00000008")
    (more / "checkpoints" / "latest").write_text("step00000006")
    out = ok(launch(more, 2)).stdout
    assert "(written by 1 ranks) to a universal checkpoint for 2 ranks" in out
    assert f"resumed from {more / 'checkpoints' / 'step00000006'} (step 6)" in out
    assert_continues(read_metrics(more), reference)


def assert_continues(records: list[dict], reference: list[dict]) -> None:
    """Same samples, schedule and (to float summation order) losses, step by step."""
    assert [r["step"] for r in records] == [r["step"] for r in reference] == list(range(1, 9))
    for r, expected in zip(records, reference):
        for key in ("data/sample_digest", "data/consumed_samples", "train/lr", "train/mask_rate", "train/adv_active"):
            assert r[key] == expected[key], (r["step"], key)
        assert r["train/loss_mlm"] == pytest.approx(expected["train/loss_mlm"], rel=1e-5), r["step"]
        # The ALUM noise is drawn from each rank's random stream, which a new world size reseeds.
        for key in ("train/loss", "train/grad_norm"):
            assert r[key] == pytest.approx(expected[key], rel=1e-4), (r["step"], key)
