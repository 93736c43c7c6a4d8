"""Real DeepSpeed training on CPU: 2 ranks over gloo, ZeRO-2 and ZeRO-3, on WikiText-2 shards.

One reference ALUM run per ZeRO stage (8 steps: standard MLM for 4, then ALUM) is shared by
the tests of metrics, W&B, resume, export and continual pretraining.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from helpers import (
    RUN,
    SUPPORT,
    checkpoint_logits,
    comparable,
    kill_when,
    ok,
    pretrain,
    raises_naming,
    read_metrics,
    refused_in_one_line,
    run_alum,
    tree_digest,
    wandb_history,
    wandb_records,
)

from data_prep.errors import UserError
from data_prep.tokenizer_dir import load_tokenizer
from pipeline.data.batches import ShardDataset, masked_batch
from pipeline.data.masking import MaskVocab
from pipeline.train.flops import flops_per_token
from pipeline.train.validation import EVAL_SEED_OFFSET

pytestmark = pytest.mark.slow


def test_alum_run_shows_both_stages(reference, train_shards, bert_tokenizer):
    _, run_dir = reference
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    required = {
        "train/loss",
        "train/loss_mlm",
        "train/loss_adv",
        "train/mask_rate",
        "train/lr",
        "train/grad_norm",
        "train/adv_skipped",
        "perf/tokens_per_s",
        "data/consumed_samples",
        "data/sample_digest",
    }
    assert all(required <= set(r) for r in records)
    standard, alum = records[:4], records[4:]
    assert all(r["train/loss_adv"] == 0.0 and r["train/adv_active"] == 0 for r in standard)
    assert all(r["train/loss"] == r["train/loss_mlm"] for r in standard)
    assert all(r["train/loss_adv"] > 0.0 and r["train/adv_active"] == 1 and r["train/delta_norm"] > 0 for r in alum)
    for r in alum:
        assert r["train/loss"] == pytest.approx(r["train/loss_mlm"] + 10.0 * r["train/loss_adv"], rel=1e-6)
        assert r["train/loss_adv"] > 1e-6
        assert r["train/adv_ratio"] == pytest.approx(10.0 * r["train/loss_adv"] / r["train/loss_mlm"], rel=1e-6)
        assert 0.0 <= r["train/delta_lost"] < 0.01  # fp32 keeps a delta of this size
        assert r["train/adv_grad_norm_log10"] == pytest.approx(math.log10(r["train/adv_grad_norm"]))
    assert not any("train/adv_grad_norm_log10" in r for r in standard)
    assert all(r["train/adv_ratio"] == 0.0 and r["train/delta_lost"] == 0.0 for r in standard)
    assert [r["data/consumed_samples"] for r in records] == [16 * s for s in range(1, 9)]
    assert len({r["data/sample_digest"] for r in records}) == 8
    assert all(r["train/mask_rate"] == 0.05 for r in records)  # 128 samples of ~1,800: the first 20% of the epoch
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in records)
    assert records[3]["eval/ppl"] == pytest.approx(math.exp(records[3]["eval/loss"]))
    # The validation rows (eval.batches 4 x micro-batch 4, in all) masked here as evaluate does: the
    # commonest-token baseline beside the accuracy, and an accuracy that counts whole tokens.
    vocab = MaskVocab.of(load_tokenizer(bert_tokenizer))
    val = ShardDataset(train_shards, "val")
    labels = masked_batch(val, np.arange(16) % len(val), step=0, seed=EVAL_SEED_OFFSET, rate=0.15, vocab=vocab).labels
    for r in (records[3], records[7]):
        assert r["eval/commonest_token_accuracy"] == pytest.approx(
            torch.bincount(labels).max().item() / labels.numel(), abs=1e-12
        )
        assert r["eval/accuracy"] * labels.numel() == pytest.approx(
            round(r["eval/accuracy"] * labels.numel()), abs=1e-6
        )
    model = json.loads((run_dir / "model" / "config.json").read_text())
    for r in records:
        per_token = flops_per_token(
            hidden=model["hidden_size"],
            layers=model["num_hidden_layers"],
            intermediate=model["intermediate_size"],
            vocab=model["vocab_size"],
            seq_len=64,
            mask_rate=r["train/mask_rate"],
        )
        assert r["perf/mfu"] == pytest.approx(per_token * r["perf/tokens_per_s"] / (0.5e12 * 2), rel=1e-9)
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000008"


def test_validation_reads_the_same_rows_on_one_and_on_two_ranks(tmp_path, train_shards, bert_tokenizer):
    """12 rows (3 x 4): 6 per rank, padded to 8 with repeats that count for nothing. It read
    eval.batches x micro-batch rows per rank: twice as many on 2 ranks (perplexity 867 vs 1061)."""
    common = (
        "model.config=configs/models/tiny-no-dropout.yaml",
        "train.max_steps=1",
        "eval.every_steps=1",
        "eval.batches=3",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "adversarial.method=none",
        "checkpoint.every_steps=100",
    )
    evaluated = []
    for world in (1, 2):
        ok(pretrain(tmp_path / f"world{world}", train_shards, bert_tokenizer, *common, world=world, stage=2))
        (record,) = read_metrics(tmp_path / f"world{world}")
        evaluated.append({key: value for key, value in record.items() if key.startswith("eval/")})
    one, two = evaluated
    assert one.keys() == two.keys() and len(one) == 4
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key  # no dropout: the same model up to float rounding
    vocab = MaskVocab.of(load_tokenizer(bert_tokenizer))
    labels = masked_batch(
        ShardDataset(train_shards, "val"), np.arange(12), step=0, seed=EVAL_SEED_OFFSET, rate=0.15, vocab=vocab
    ).labels
    assert one["eval/commonest_token_accuracy"] == pytest.approx(
        torch.bincount(labels).max().item() / labels.numel(), abs=1e-12
    )


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
@pytest.mark.parametrize("launcher, world, stage", [("alum", 1, 0), ("torchrun", 2, 1)])
def test_sample_order_does_not_depend_on_launcher_world_size_or_stage(
    reference, tmp_path, train_shards, bert_tokenizer, launcher, world, stage
):
    _, run_dir = reference
    other = tmp_path / launcher
    ok(
        pretrain(
            other, train_shards, bert_tokenizer, *RUN, "train.max_steps=3", launcher=launcher, world=world, stage=stage
        )
    )
    digests = [r["data/sample_digest"] for r in read_metrics(other)]
    assert digests == [r["data/sample_digest"] for r in read_metrics(run_dir)][:3]


def test_wandb_offline_run_has_the_same_metrics(reference):
    _, run_dir = reference
    logged = wandb_history(run_dir)
    assert sorted(logged) == list(range(1, 9))
    for metrics in read_metrics(run_dir):
        row = logged[metrics["step"]]
        for key in ("train/loss", "train/loss_mlm", "train/loss_adv", "train/mask_rate", "data/sample_digest"):
            assert row[key] == metrics[key], key
        assert row.get("train/adv_grad_norm_log10") == metrics.get("train/adv_grad_norm_log10")
    records = wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["adversarial"]["method"] == "alum"
    assert config["train"]["max_steps"] == 8


def test_resume_equals_the_uninterrupted_run(reference, tmp_path, train_shards, bert_tokenizer):
    stage, uninterrupted = reference
    run_dir = tmp_path / "interrupted"
    process = pretrain(
        run_dir,
        train_shards,
        bert_tokenizer,
        *RUN,
        stage=stage,
        start=subprocess.Popen,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(run_dir / "checkpoints" / "step00000004" / "complete.json", process)
    assert not (run_dir / "checkpoints" / "step00000008" / "complete.json").exists(), "killed too late to test resume"

    resumed = ok(pretrain(run_dir, train_shards, bert_tokenizer, *RUN, stage=stage))
    assert "resumed from" in resumed.stdout and "step00000004" in resumed.stdout
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(uninterrupted))
    # Both launches wrote to the same W&B run.
    launches = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(launches) == 2 and len({p.name.rsplit("-", 1)[1] for p in launches}) == 1
    # kill -9 can lose what W&B had not flushed; the resumed launch logs everything after the checkpoint.
    assert set(range(5, 9)) <= set(wandb_history(run_dir))


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_finished_run_relaunched_does_nothing(reference, tmp_path, train_shards, bert_tokenizer):
    import shutil

    _, run_dir = reference
    finished = tmp_path / "run"
    shutil.copytree(run_dir, finished)
    before = sorted(p.name for p in (finished / "wandb").iterdir())
    result = ok(pretrain(finished, train_shards, bert_tokenizer, *RUN, world=1, stage=2))
    assert (
        f"{finished}: already at train.max_steps=8 (step00000008); nothing to do (raise train.max_steps to continue)"
        in result.stdout
    )
    assert "resumed from" not in result.stdout and "step 8/8" not in result.stdout
    assert sorted(p.name for p in (finished / "wandb").iterdir()) == before  # no new W&B run


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_run_directory_from_before_the_marker_resumes_and_gets_the_marker(
    reference, tmp_path, train_shards, bert_tokenizer
):
    import shutil

    _, run_dir = reference
    old = tmp_path / "run"
    shutil.copytree(run_dir, old)
    for name in (".alum-output.json", ".lock"):  # what a run directory written before them lacks
        (old / name).unlink(missing_ok=True)
    result = ok(pretrain(old, train_shards, bert_tokenizer, *RUN, "train.max_steps=9"))
    assert f"resumed from {old / 'checkpoints' / 'step00000008'} (step 8)" in result.stdout
    assert [r["step"] for r in read_metrics(old)] == list(range(1, 10))
    assert json.loads((old / ".alum-output.json").read_text())["written_by"] == "pipeline.pretrain"


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    reference, tmp_path, train_shards, bert_tokenizer
):
    import shutil

    from pipeline.train.integrity import problems

    _, uninterrupted = reference
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    step8 = run_dir / "checkpoints" / "step00000008"
    recorded = json.loads((step8 / "complete.json").read_text())["files"]
    assert {"mp_rank_00_model_states.pt", "rng_rank00000.pt", "rng_rank00001.pt"} <= set(recorded)
    largest = max(recorded, key=lambda name: recorded[name]["size"])
    with open(step8 / largest, "r+b") as f:
        f.truncate(recorded[largest]["size"] // 2)
    result = ok(pretrain(run_dir, train_shards, bert_tokenizer, *RUN, stage=2))
    assert (
        f"{step8}: damaged ({largest}: {recorded[largest]['size'] // 2:,} bytes, {recorded[largest]['size']:,} when "
        "saved); "
        "set aside, resuming from step00000004"
    ) in result.stdout
    assert "resumed from" in result.stdout and "(step 4)" in result.stdout
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(uninterrupted))
    assert problems(step8, json.loads((step8 / "complete.json").read_text())["files"]) == []  # saved again, whole


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_checkpoint_written_on_gpus_resumes_on_cpus(reference, tmp_path, train_shards, bert_tokenizer):
    """Its RNG states carry a CUDA generator's (16 bytes: seed and offset), which a CPU machine
    has no use for: the CPU's are restored, the launch says so, and the run goes on exactly."""
    import shutil

    from pipeline.train.integrity import digest

    _, uninterrupted = reference
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step00000008")
    (run_dir / "checkpoints" / "latest").write_text("step00000004")
    step4 = run_dir / "checkpoints" / "step00000004"
    complete = json.loads((step4 / "complete.json").read_text())
    for rank in range(2):
        name = f"rng_rank{rank:05d}.pt"
        state = torch.load(step4 / name, weights_only=False)
        assert state["accelerator"] is None  # written on CPUs
        torch.save({**state, "accelerator": torch.arange(16, dtype=torch.uint8)}, step4 / name)
        complete["files"][name] = digest(step4 / name)
    (step4 / "complete.json").write_text(json.dumps(complete))
    result = ok(pretrain(run_dir, train_shards, bert_tokenizer, *RUN, stage=2))
    assert (
        f"{step4}: its accelerator's RNG states were written on a GPU and are unused here (no accelerator): "
        "the CPU's are restored"
    ) in result.stdout.splitlines()
    assert "(step 4)" in result.stdout
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(uninterrupted))


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_with_every_checkpoint_damaged_the_run_stops_in_one_line(reference, tmp_path, train_shards, bert_tokenizer):
    import shutil

    _, uninterrupted = reference
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    for tag in ("step00000004", "step00000008"):
        with open(run_dir / "checkpoints" / tag / "rng_rank00000.pt", "ab") as f:
            f.write(b"!")
    result = pretrain(run_dir, train_shards, bert_tokenizer, *RUN, world=1, stage=2)
    assert result.returncode == 2, result.stderr
    step4 = run_dir / "checkpoints" / "step00000004"
    assert result.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: {step4}: damaged (rng_rank00000.pt: {step4.joinpath('rng_rank00000.pt').stat().st_size:,} "
        "bytes, "
        f"{step4.joinpath('rng_rank00000.pt').stat().st_size - 1:,} when saved) and no earlier complete checkpoint to "
        "resume from; "
        "restore it, or start another run directory"
    )


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_full_disk_during_a_save_stops_the_job_in_one_line_and_keeps_the_previous_checkpoint(
    reference, tmp_path, train_shards, bert_tokenizer, monkeypatch
):
    _, uninterrupted = reference
    run_dir = tmp_path / "run"
    full = run_dir / "checkpoints" / "step00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    monkeypatch.setenv(
        "ALUM_TEST_DISK_FULL", str(full.relative_to(run_dir / "checkpoints"))
    )  # rank 1's share of step 8
    failed = pretrain(run_dir, train_shards, bert_tokenizer, *RUN, stage=2, python_path=(SUPPORT / "disk_full",))
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("pretrain:")]
    assert errors == [
        f"pretrain: stopped: checkpoint step00000008 not saved ({full}: No space left on device); "
        "it was removed, and step00000004 stays the latest complete one"
    ], failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert not full.parent.exists() and (run_dir / "checkpoints" / "latest").read_text() == "step00000004"
    # What a relaunch then loads is the step-4 checkpoint, as after any stop (test_resume_equals_the_uninterrupted_run).
    assert comparable(read_metrics(run_dir))[:4] == comparable(read_metrics(uninterrupted))[:4]


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_checkpoint_that_fills_a_real_disk_stops_the_job_in_one_line_and_keeps_the_previous_checkpoint(
    reference, small_disk, train_shards, bert_tokenizer
):
    """torch.save reports a full disk as a RuntimeError ("inline_container.cc ... unexpected pos"),
    not an OSError. On a tmpfs with room for the run and half a checkpoint, the step-4 checkpoint
    resumed, step 5's save fails. What a relaunch then loads is the step-4 checkpoint, as after
    any stop (test_resume_equals_the_uninterrupted_run)."""
    import shutil

    _, uninterrupted = reference
    disk = small_disk.mount(64 << 20)
    run_dir = disk / "run"
    shutil.copytree(uninterrupted, run_dir, ignore=shutil.ignore_patterns("step00000008"))
    (run_dir / "checkpoints" / "latest").write_text("step00000004")
    checkpoint_bytes = sum(p.stat().st_size for p in (uninterrupted / "checkpoints" / "step00000008").iterdir())
    small_disk.resize(small_disk.used() + checkpoint_bytes // 2)
    to_step_5 = (*RUN, "train.max_steps=5", "checkpoint.every_steps=1")

    failed = pretrain(run_dir, train_shards, bert_tokenizer, *to_step_5)
    assert failed.returncode == 3, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("pretrain:")]
    assert len(errors) == 1 and re.fullmatch(
        r"pretrain: stopped: checkpoint step00000005 not saved \(.+\); it was removed, "
        r"and step00000004 stays the latest complete one",
        errors[0],
    ), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000004"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000004"


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_step_saved_again_over_its_complete_checkpoint_is_what_the_next_launch_resumes_from(
    reference, tmp_path, train_shards, bert_tokenizer
):
    """A kill after step 8's complete.json was written but before `latest` moved leaves `latest`
    at step 4 (written here as the kill leaves it): the relaunch trains steps 5-8 again and saves
    step 8 over the complete one, keeping only it (keep_last=1). The next launch must find it
    as saved: it checks exactly this (`pipeline.train.resume.verified`) before loading."""
    import shutil

    from pipeline.train import checkpoint
    from pipeline.train.integrity import problems

    _, uninterrupted = reference
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step00000004")
    ok(pretrain(run_dir, train_shards, bert_tokenizer, *RUN, "checkpoint.keep_last=1"))
    step8 = run_dir / "checkpoints" / "step00000008"
    assert checkpoint.complete_tags(run_dir) == ["step00000008"] and checkpoint.latest_complete(run_dir) == (
        "step00000008",
        None,
    )
    recorded = checkpoint.recorded_files(run_dir, "step00000008")
    assert sorted(recorded) == sorted(p.name for p in step8.iterdir() if p.name != "complete.json")
    assert problems(step8, recorded) == []


def test_export_matches_the_training_model(reference, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pipeline.tasks.export import export

    stage, run_dir = reference
    out = export(run_dir, tmp_path / "hf")
    expected = checkpoint_logits(run_dir, "step00000008", tmp_path / "logits.pt")
    model = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits[
            expected["masked"]
        ]
    assert logits.shape == expected["logits"].shape
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.mask_token_id == 4 and len(tokenizer) == 2000
    # A tag that is not there: the error lists those that are.
    with pytest.raises(UserError, match=r"step00000099: not a complete checkpoint \(complete: .*step00000008\)"):
        export(run_dir, tmp_path / "wrong-tag", tag="step00000099")
    assert not (tmp_path / "wrong-tag").exists()


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_export_replaces_only_its_own_output_and_never_the_run(reference, tmp_path):
    from pipeline.tasks.export import export

    _, source = reference
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = tree_digest(run_dir)
    refused_in_one_line(
        run_alum("export", "--run-dir", run_dir, "--out", run_dir, "--overwrite"),
        f"alum export: error: --out {run_dir}: is the --run-dir {run_dir}",
    )
    with raises_naming(f"--out {run_dir / 'model'}: lies inside the --run-dir {run_dir}"):
        export(run_dir, run_dir / "model", overwrite=True)
    with raises_naming(f"--out {tmp_path}: contains the --run-dir {run_dir}"):
        export(run_dir, tmp_path, overwrite=True)
    assert tree_digest(run_dir) == before
    # Its own earlier export is replaced.
    out = export(run_dir, tmp_path / "hf")
    export(run_dir, out, tag="step00000004", overwrite=True)
    assert json.loads((out / ".alum-output.json").read_text())["written_by"] == "alum export"


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_continual_pretraining_from_an_export_and_from_a_checkpoint(reference, tmp_path, train_shards, bert_tokenizer):
    from pipeline.tasks.export import export, load_exported_weights

    stage, run_dir = reference
    exported = export(run_dir, tmp_path / "hf")
    original = load_exported_weights(run_dir, "step00000008").state_dict()

    # From the exported HF model, with lr 0: the new run's weights are exactly the export's.
    from_hf = tmp_path / "from-hf"
    ok(
        pretrain(
            from_hf,
            train_shards,
            bert_tokenizer,
            "train.max_steps=1",
            "train.lr=0.0",
            f"model.init_from={exported}",
            "adversarial.method=alum",
            "adversarial.start_step=0",
            "checkpoint.every_steps=1",
            world=1,
            stage=0,
        )
    )
    assert _same_weights(load_exported_weights(from_hf, "step00000001").state_dict(), original)

    # From the run's checkpoint, weights only: a fresh schedule and data order.
    weights_only = tmp_path / "weights-only"
    ok(
        pretrain(
            weights_only,
            train_shards,
            bert_tokenizer,
            "train.max_steps=1",
            "train.lr=0.0",
            f"checkpoint.init_from={run_dir}",
            "checkpoint.every_steps=1",
        )
    )
    assert _same_weights(load_exported_weights(weights_only, "step00000001").state_dict(), original)
    assert read_metrics(weights_only)[0]["data/consumed_samples"] == 16

    # Weights and optimizer: the standard run goes on with ALUM from where it stopped.
    continued = tmp_path / "continued"
    ok(
        pretrain(
            continued,
            train_shards,
            bert_tokenizer,
            "train.max_steps=10",
            f"checkpoint.init_from={run_dir}",
            "checkpoint.init_optimizer=true",
            "adversarial.method=alum",
            "checkpoint.every_steps=5",
        )
    )
    records = read_metrics(continued)
    assert [r["step"] for r in records] == [9, 10]
    assert records[0]["data/consumed_samples"] == 9 * 16
    assert records[0]["train/loss_mlm"] < read_metrics(run_dir)[0]["train/loss_mlm"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_sigterm_to_one_rank_saves_exits_zero_and_resumes_exactly(reference, tmp_path, train_shards, bert_tokenizer):
    import psutil

    _, uninterrupted = reference
    run_dir = tmp_path / "preempted"
    process = pretrain(
        run_dir,
        train_shards,
        bert_tokenizer,
        *RUN,
        start=subprocess.Popen,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = [
        p for p in psutil.Process(process.pid).children(recursive=True) if "pipeline.pretrain" in " ".join(p.cmdline())
    ]
    second = next(p for p in ranks if "--local_rank=1" in p.cmdline())
    second.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "stop requested (by another rank): saved step" in output
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 2 <= stopped_at < 8
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{stopped_at:08d}"

    resumed = ok(pretrain(run_dir, train_shards, bert_tokenizer, *RUN))
    assert f"step{stopped_at:08d}" in resumed.stdout
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(uninterrupted))
