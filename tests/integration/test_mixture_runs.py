"""Training on a mixture of two corpora (tests/conftest.py `mixture_reference`): per-source
metrics and validation, and resumes that read the same batches (after kill -9, and on one
rank instead of two), compared by `data/sample_digest`."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from helpers import comparable, kill_when, ok, pretrain, read_metrics

pytestmark = pytest.mark.slow

SOURCES = ("wiki", "shakespeare")


def test_each_source_logs_its_samples_and_each_named_set_its_validation(mixture_reference):
    run_dir, _ = mixture_reference
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        counts = [r[f"data/{name}/consumed_samples"] for name in SOURCES]
        assert sum(counts) == r["data/consumed_samples"] == 16 * r["step"]
        assert all(r[f"data/{name}/epoch"] == 0 for name in SOURCES)  # 128 samples: no source is through
    wiki_share = records[-1]["data/wiki/consumed_samples"] / records[-1]["data/consumed_samples"]
    assert 0.6 < wiki_share < 0.9  # weight 3 of 4, over 128 samples
    for r in records:
        evaluated = r["step"] % 4 == 0
        for name in (*SOURCES, "sst2"):  # the sources' val splits and eval.sets' sst2
            assert (f"eval/{name}/loss" in r) == evaluated
            if evaluated:
                assert 0 < r[f"eval/{name}/loss"] < 20 and 0 <= r[f"eval/{name}/accuracy"] <= 1
                assert r[f"eval/{name}/ppl"] == pytest.approx(2.718281828459045 ** r[f"eval/{name}/loss"])
        assert "eval/loss" not in r  # a mixture has no one val split
    losses = {records[3][f"eval/{name}/loss"] for name in (*SOURCES, "sst2")}
    assert len(losses) == 3  # three different sets of rows


def test_a_mixture_run_killed_at_a_checkpoint_resumes_batch_for_batch(
    mixture_reference, tmp_path, train_shards, bert_tokenizer
):
    reference, overrides = mixture_reference
    run_dir = tmp_path / "interrupted"
    process = pretrain(
        run_dir,
        train_shards,
        bert_tokenizer,
        *overrides,
        start=subprocess.Popen,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(run_dir / "checkpoints" / "step00000004" / "complete.json", process)
    assert not (run_dir / "checkpoints" / "step00000008" / "complete.json").exists(), "killed too late to test resume"
    resumed = ok(pretrain(run_dir, train_shards, bert_tokenizer, *overrides))
    assert "step00000004" in resumed.stdout
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(reference))


def test_a_mixture_run_of_two_ranks_resumed_on_one_reads_the_same_batches(
    mixture_reference, tmp_path, train_shards, bert_tokenizer
):
    reference, overrides = mixture_reference
    run_dir = tmp_path / "two-then-one"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step00000008")
    (run_dir / "checkpoints" / "latest").write_text("step00000004")
    ok(pretrain(run_dir, train_shards, bert_tokenizer, *overrides, world=1))
    same = ["data/sample_digest", "data/consumed_samples", "train/mask_rate"]
    same += [f"data/{name}/{key}" for name in SOURCES for key in ("consumed_samples", "epoch")]
    resumed, expected = read_metrics(run_dir), read_metrics(reference)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [[r[k] for k in same] for r in resumed[4:]] == [[r[k] for k in same] for r in expected[4:]]
