"""Bad inputs to training: one clear line naming the file or key, a non-zero exit, nothing lost."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from deepspeed.accelerator import get_accelerator
from helpers import REPO, pretrain, pretrain_args, read_metrics, tree_digest

from data_prep.corpus import ReadOptions
from data_prep.inputs import expand_inputs
from data_prep.tokenizer import train_tokenizer
from pipeline.train.distributed import free_port

pytestmark = pytest.mark.slow


def refused(result, *fragments: str) -> str:
    """The run exited 2 with exactly one error line, which contains every fragment."""
    lines = [line for line in result.stderr.splitlines() if "pretrain: error:" in line]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_shards_built_with_another_tokenizer(tmp_path, train_shards, wikitext_valid):
    other = tmp_path / "other-tokenizer"
    train_tokenizer(expand_inputs([str(wikitext_valid)]), ReadOptions(), other, vocab_size=800)
    result = pretrain(tmp_path / "run", train_shards, other, world=1, stage=0)
    refused(result, f"{train_shards}: shards were built with another tokenizer", str(other))
    assert not (tmp_path / "run").exists()


def test_model_vocabulary_smaller_than_the_tokenizer(tmp_path, train_shards, bert_tokenizer):
    model = tmp_path / "small-vocab.yaml"
    model.write_text(
        "arch: bert\nhidden_size: 32\nnum_hidden_layers: 1\nnum_attention_heads: 2\nintermediate_size: "
        "64\nvocab_size: 1000\n"
    )
    result = pretrain(tmp_path / "run", train_shards, bert_tokenizer, f"model.config={model}", world=1, stage=0)
    refused(result, f"{model}: model vocab_size 1000 is smaller than the tokenizer's 2000")


def test_sequence_longer_than_the_model_positions(tmp_path, train_shards, bert_tokenizer):
    model = tmp_path / "short.yaml"
    model.write_text(
        "arch: bert\nhidden_size: 32\nnum_hidden_layers: 1\nnum_attention_heads: 2\nintermediate_size: "
        "64\nmax_position_embeddings: 32\n"
    )
    result = pretrain(tmp_path / "run", train_shards, bert_tokenizer, f"model.config={model}", world=1, stage=0)
    refused(result, f"{model}: shards have seq_len 64 but the model has 32 positions")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "adversarial.asa.layers=0,2",
            "adversarial.asa.layers: layer 2 does not exist (the model has 2 layers, 0 to 1)",
        ),
        ("model.activation_checkpointing=true", "adversarial.method=asa: model.activation_checkpointing must be false"),
    ],
)
def test_what_asa_cannot_run_with_stops_before_set_up(tmp_path, train_shards, bert_tokenizer, override, message):
    result = pretrain(
        tmp_path / "run", train_shards, bert_tokenizer, "adversarial.method=asa", override, world=1, stage=0
    )
    refused(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(
    bool(get_accelerator().is_fp16_supported()),
    reason="this machine's accelerator has fp16 (a CPU with AVX512-FP16/AMX)",
)
def test_a_precision_the_accelerator_lacks_stops_before_set_up(tmp_path, train_shards, bert_tokenizer):
    result = pretrain(tmp_path / "run", train_shards, bert_tokenizer, "train.precision=fp16", world=1, stage=0)
    line = refused(
        result, "train.precision=fp16: this machine's accelerator (cpu) does not support fp16; use bf16 or fp32"
    )
    assert [other for other in result.stderr.splitlines() if "fp16" in other] == [line]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_shards_without_a_val_split_name_both_ways_out(tmp_path, bert_tokenizer, wikitext_valid):
    from data_prep.shard import ShardSettings, shard_corpus

    shards = tmp_path / "no-val"
    shard_corpus([str(wikitext_valid)], bert_tokenizer, shards, settings=ShardSettings(seq_len=64, val_fraction=0.0))
    result = pretrain(tmp_path / "run", shards, bert_tokenizer, "eval.every_steps=2", world=1, stage=0)
    refused(
        result,
        f"{shards}: no 'val' split to validate on (splits: train)",
        "`alum shard --val-fraction 0.01`",
        "eval.every_steps=0",
    )
    assert not (tmp_path / "run").exists()


def test_global_batch_not_divisible_by_micro_batch_times_world_size(tmp_path, train_shards, bert_tokenizer):
    result = pretrain(tmp_path / "run", train_shards, bert_tokenizer, "train.global_batch_size=12", world=2, stage=2)
    refused(result, "train.global_batch_size 12 is not divisible by train.micro_batch_size 4 x world size 2")


def test_missing_and_corrupt_shards(tmp_path, train_shards, bert_tokenizer):
    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    victim = sorted((shards / "train").glob("*.arrow"))[0]
    original = victim.read_bytes()
    victim.unlink()
    refused(
        pretrain(tmp_path / "a", shards, bert_tokenizer, world=1, stage=0),
        f"{victim}: shard listed in the manifest is missing",
    )

    altered = bytearray(original)
    altered[len(altered) // 2] ^= 0x01
    victim.write_bytes(bytes(altered))
    refused(
        pretrain(tmp_path / "b", shards, bert_tokenizer, world=1, stage=0),
        f"{victim}: sha256 does not match the manifest",
    )


def test_unknown_config_key_and_wrong_type(tmp_path, train_shards, bert_tokenizer):
    refused(
        pretrain(tmp_path / "a", train_shards, bert_tokenizer, "train.max_step=5", world=1, stage=0),
        "train.max_step: unknown config key",
    )
    refused(
        pretrain(tmp_path / "b", train_shards, bert_tokenizer, "adversarial.alpha=lots", world=1, stage=0),
        "adversarial.alpha: expected float, got 'lots'",
    )


def test_checkpoint_of_another_model_shape(tmp_path, train_shards, bert_tokenizer):
    source = tmp_path / "source"
    assert pretrain(source, train_shards, bert_tokenizer, "train.max_steps=1", world=1, stage=0).returncode == 0
    wider = tmp_path / "wider.yaml"
    wider.write_text(
        "arch: bert\nhidden_size: 96\nnum_hidden_layers: 2\nnum_attention_heads: 2\nintermediate_size: 256\n"
    )
    result = pretrain(
        tmp_path / "run",
        train_shards,
        bert_tokenizer,
        f"model.config={wider}",
        f"checkpoint.init_from={source}",
        world=1,
        stage=0,
    )
    refused(result, f"{source / 'checkpoints' / 'step00000001'}: checkpoint does not fit this model", "size mismatch")


def test_changed_config_on_an_existing_run(tmp_path, train_shards, bert_tokenizer):
    run = tmp_path / "run"
    assert pretrain(run, train_shards, bert_tokenizer, "train.max_steps=1", world=1, stage=0).returncode == 0
    before = (run / "config.yaml").read_text()
    refused(
        pretrain(run, train_shards, bert_tokenizer, "train.max_steps=2", "train.lr=0.1", world=1, stage=0),
        "this run was started with train.lr=0.001, not 0.1; use a new --run-dir",
    )
    assert (run / "config.yaml").read_text() == before


def test_a_directory_that_is_not_a_run_directory_is_refused_and_left_as_it_was(tmp_path, train_shards, bert_tokenizer):
    notes = tmp_path / "notes"
    (notes / "checkpoints" / "step_notes").mkdir(parents=True)
    (notes / "checkpoints" / "step_notes" / "todo.txt").write_text("mine")
    (notes / "model").mkdir()
    (notes / "model" / "config.json").write_text('{"my": "model"}')
    (notes / "config.yaml").write_text("- my\n- own\n- list\n")
    before = tree_digest(notes)
    refused(
        pretrain(notes, train_shards, bert_tokenizer, "train.max_steps=1", world=1, stage=0),
        f"{notes}: not a run directory (no .alum-output.json, and not laid out as a run from before the marker",
        "nothing in it was changed",
    )
    assert tree_digest(notes) == before


def test_a_second_job_on_a_run_directory_is_refused_and_a_killed_one_blocks_nothing(
    tmp_path, train_shards, bert_tokenizer
):
    run, log = tmp_path / "run", tmp_path / "launch.log"
    endless = ("train.max_steps=100000", "checkpoint.every_steps=100000", "eval.every_steps=0")
    first = launch_logged(run, log, train_shards, bert_tokenizer, *endless)
    try:
        wait_for(lambda: f"pid {first.pid}" in lock_holder(run) or "step 1/" in log.read_text(), first)
        second = pretrain(run, train_shards, bert_tokenizer, *endless, world=1, stage=0, timeout=120)
        refused(
            second, f"{run}: another job is writing to this run directory (host {socket.gethostname()} pid {first.pid},"
        )
        wait_for(lambda: "step 1/" in log.read_text(), first)  # training, its stop signals handled
        first.send_signal(signal.SIGTERM)  # its normal end: save a checkpoint, exit 0
        assert first.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        kill_group(first)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, len(steps) + 1))  # each step once: the second job wrote nothing

    # kill -9 of a job that holds the lock leaves none behind: the next launch takes it.
    killed = launch_logged(run, log, train_shards, bert_tokenizer, *endless)
    wait_for(lambda: f"pid {killed.pid}" in lock_holder(run), killed)
    kill_group(killed)
    relaunched = pretrain(
        run, train_shards, bert_tokenizer, f"train.max_steps={steps[-1] + 1}", "eval.every_steps=0", world=1, stage=0
    )
    assert relaunched.returncode == 0, relaunched.stderr[-2000:]
    assert f"step {steps[-1] + 1}/{steps[-1] + 1}" in relaunched.stdout


def launch_logged(run, log, shards, tokenizer, *overrides):
    """A one-rank launch in a session of its own, its output in `log`."""
    with open(log, "w") as out:
        return pretrain(
            run,
            shards,
            tokenizer,
            *overrides,
            world=1,
            stage=0,
            start=subprocess.Popen,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def lock_holder(run) -> str:
    """What the run directory's lock file says (its holder, once one has taken it)."""
    path = run / ".lock"
    return path.read_text() if path.exists() else ""


def wait_for(condition, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, "the launch ended, or never got there"
        time.sleep(0.05)


def kill_group(process) -> None:
    """kill -9 of a launch started in a session of its own, as a crash or `scancel` would end it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_non_finite_loss_skips_then_aborts_with_the_last_good_checkpoint(tmp_path, train_shards, bert_tokenizer):
    run = tmp_path / "run"
    result = pretrain(
        run,
        train_shards,
        bert_tokenizer,
        "train.max_steps=20",
        "train.lr=1e6",
        "train.warmup_steps=1",
        "train.max_bad_steps=2",
        "checkpoint.every_steps=1",
        "adversarial.method=none",
        world=1,
        stage=2,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    message = next(line for line in result.stderr.splitlines() if "pretrain: stopped:" in line)
    assert "non-finite loss for 3 steps in a row (train.max_bad_steps=2)" in message
    records = read_metrics(run)
    bad = [r for r in records if r["train/loss"] == "nan" or r["train/loss"] == "inf"]
    assert len(bad) == 3 and records[-1] == bad[-1]
    last_good = max(r["step"] for r in records if r not in bad)
    latest = (run / "checkpoints" / "latest").read_text()
    assert latest == f"step{last_good:08d}" and latest in message
    assert (run / "checkpoints" / latest / "complete.json").is_file()
    assert not list((run / "checkpoints").glob(f"step{last_good + 1:08d}"))


def node_launch(rank: int, run_dir, shards, tokenizer, port: int, *overrides: str, nodes: int = 2):
    """One node of a multi-node job: DeepSpeed's launcher without ssh, one rank per node, on 127.0.0.1."""
    hostfile = run_dir.parent / "hostfile"
    hostfile.write_text("".join(f"node{n} slots=1\n" for n in range(nodes)))
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "--module",
        "pipeline.pretrain",
        *pretrain_args(run_dir, shards, tokenizer, *overrides),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_nodes_started_with_different_configs(tmp_path, train_shards, bert_tokenizer):
    run, port = tmp_path / "run", free_port()
    nodes = [
        node_launch(0, run, train_shards, bert_tokenizer, port),
        node_launch(1, run, train_shards, bert_tokenizer, port, "train.lr=0.002"),
    ]
    results = [(*p.communicate(timeout=300), p.returncode) for p in nodes]
    assert [code for _, _, code in results] == [2, 2], results[1][1][-3000:]
    lines = [line for line in results[0][1].splitlines() if "pretrain: error:" in line]
    assert lines == [
        "pretrain: error: rank 1 was started with another config than rank 0: train.lr=0.002 there, 0.001 on rank 0; "
        "launch every node with the same config and overrides"
    ]
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_unreachable_master(tmp_path, train_shards, bert_tokenizer):
    run, port = tmp_path / "run", free_port()  # nobody listens there: node 0 was never started
    started = time.monotonic()
    node = node_launch(1, run, train_shards, bert_tokenizer, port, "train.dist_timeout_s=5")
    _, err = node.communicate(timeout=300)
    assert node.returncode == 2
    assert time.monotonic() - started < 120
    lines = [line for line in err.splitlines() if "pretrain: error:" in line]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(
        f"pretrain: error: rank 1 of 2: no rendezvous at 127.0.0.1:{port} within 5 s (train.dist_timeout_s)"
    )
    assert not run.exists()


def test_online_wandb_without_an_api_key_stops_before_any_set_up(tmp_path, train_shards, bert_tokenizer, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings file
    monkeypatch.delenv("NETRC", raising=False)
    result = pretrain(tmp_path / "run", train_shards, bert_tokenizer, "wandb.mode=online", world=1, stage=0)
    refused(
        result,
        "wandb.mode=online but no W&B API key is configured: run `wandb login`, set WANDB_API_KEY, "
        "or train with wandb.mode=offline and upload later with `wandb sync`",
    )
    assert not (tmp_path / "run").exists()
