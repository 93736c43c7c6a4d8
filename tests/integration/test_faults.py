"""Fault injection (bench/fault_injection.py) on the 8-step reference run: kill -9 a 2-rank
run three times (the whole job mid-step, one rank mid-step, the whole job during a checkpoint
save), relaunch after each, and check that every relaunch resumed from the newest complete
checkpoint and the finished run equals the uninterrupted one sample for sample.
"""

from __future__ import annotations

import pytest
from fault_injection import run_with_faults  # bench/ is on sys.path: tests/helpers.py, which conftest.py imports
from fault_report import compare, passed, report, summarize
from faults import KINDS, Fault, plan_faults
from helpers import RUN, pretrain_args
from run_files import run_settings, tag_step

pytestmark = pytest.mark.slow


def test_plan_is_seeded_and_uses_every_kind():
    plan = plan_faults(6, seed=0, max_steps=16)
    assert plan == plan_faults(6, seed=0, max_steps=16)
    assert plan != plan_faults(6, seed=1, max_steps=16)
    assert sorted(f.kind for f in plan) == sorted(KINDS * 2)
    assert [f.step for f in plan] == sorted(f.step for f in plan) and all(1 <= f.step <= 15 for f in plan)
    assert all((f.rank is not None) == (f.kind == "kill-rank") for f in plan)


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_killed_run_resumes_without_skipping_or_repeating_samples(reference, tmp_path, train_shards, bert_tokenizer):
    stage, reference_dir = reference  # RUN: 8 steps, checkpoints at 4 and 8
    run_dir = tmp_path / "faulted"
    args = pretrain_args(run_dir, train_shards, bert_tokenizer, *RUN, stage=stage)
    # The kills mid-step come first: on a loaded machine they can land a step or two late
    # without missing the run; the kill in the save of step 8 is the last.
    faults = [
        Fault("kill-group", step=5, fraction=0.5),  # in step 6: back to step 4
        Fault("kill-rank", step=5, fraction=0.5, rank=1),  # in step 6: back to step 4
        Fault("kill-in-save", step=5, fraction=0.2),  # saving step 8 (a save takes ~30 ms): back to step 4
    ]
    run = run_with_faults(args, run_dir, faults, tmp_path / "logs", echo=lambda line: None)
    comparison = compare(run_dir, reference_dir, run_settings(reference_dir)["global_batch_size"])
    summary = summarize(run, comparison)
    details = report(run, comparison, summary)
    print(details)

    assert summary["faults_injected"] == 3 and summary["by_kind"] == dict.fromkeys(KINDS, 1), details
    assert run.final_exit_code == 0, details
    for fault in run.faults:
        # from the newest complete checkpoint on disk once the job had died (step 4 here)
        assert fault.resumed and fault.resumed_step == tag_step(fault.newest_complete or "step0"), details
        # every fault lands after step 5 and before step 8's save completes: back to step 4, 1 to 4 steps redone
        assert fault.resumed_step == 4 and 1 <= fault.steps_lost <= 4, details
        assert fault.leftovers == [] and fault.all_gone_seconds is not None and not fault.hung, details
    assert run.final_leftovers == [], details
    assert run.shm_files == 0, details  # no DeepSpeed /dev/shm buffer outlives its launch, killed or not

    in_save = run.faults[2]
    assert in_save.kind == "kill-in-save" and in_save.save_tag == "step00000008", details
    assert in_save.partial_when_killed, details  # killed before complete.json was written
    assert in_save.last_logged_step == 8 and in_save.steps_lost == 4, details
    assert in_save.partials == ["step00000008"] and in_save.partial_noted, (
        details
    )  # the relaunch says it passed over it
    assert in_save.newest_complete == "step00000004" and in_save.resumed_step == 4, details
    assert "step00000004" in in_save.resumed_line, details

    assert comparison.samples_skipped_or_repeated == 0, details
    assert not comparison.loss_mismatch_steps, details
    assert comparison.exact and passed(summary), details
