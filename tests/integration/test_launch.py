"""launch/: multi-node launch rehearsed on this machine, and the launchers' bad inputs.

Two "nodes" are two DeepSpeed launchers started with `launch/node.sh` (no ssh), each with
one rank, meeting on 127.0.0.1 only. Each launcher runs under pipeline.train.supervise (see
tests/integration/test_supervise.py for what that adds).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, RUN, comparable, pretrain_args, read_metrics

pytestmark = pytest.mark.slow


def node(
    rank: int | str,
    hostfile,
    run_dir,
    shards,
    tokenizer,
    port: int,
    *extra: str,
    start=subprocess.Popen,
    env: dict | None = None,
):
    env = {
        **os.environ,
        "HOSTFILE": str(hostfile),
        "NODE_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "WANDB_SILENT": "true",
        **(env or {}),
    }
    command = ["bash", str(REPO / "launch" / "node.sh"), *pretrain_args(run_dir, shards, tokenizer, *RUN, *extra)]
    return start(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_two_node_rehearsal_equals_one_node(reference, tmp_path, train_shards, bert_tokenizer):
    from pipeline.train.distributed import free_port

    _, one_node = reference
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir, port = tmp_path / "two-nodes", free_port()
    # One rank per "node" would get both cores; the one-node ranks get one each. Thread count
    # changes float summation order, so pin it to compare bit for bit.
    nodes = [
        node(rank, hostfile, run_dir, train_shards, bert_tokenizer, port, "train.threads_per_rank=1") for rank in (0, 1)
    ]
    for process in nodes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(one_node))


@pytest.mark.parametrize(
    "hostfile_text, rank, message",
    [
        ("node0 slots=1\nnode1 slots=two\n", "0", "hostfile:2: expected '<hostname> slots=<N>', got 'node1 slots=two'"),
        ("# nothing\n\n", "0", "hostfile: no hosts listed"),
        ("node0 slots=1\nnode1 slots=1\n", "2", "NODE_RANK=2 is out of range: {hostfile} lists 2 node(s), ranks 0..1"),
        ("node0 slots=1\n", "-1", "NODE_RANK=-1 is out of range"),
    ],
    ids=["malformed-line", "empty", "rank-too-large", "rank-negative"],
)
def test_bad_hostfile_and_node_rank(tmp_path, train_shards, bert_tokenizer, hostfile_text, rank, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hostfile_text)
    result = node(rank, hostfile, tmp_path / "run", train_shards, bert_tokenizer, 29500, start=subprocess.run)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message.format(hostfile=hostfile) in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RESTARTS": "two"}, "launch: error: RESTARTS=two is not a whole number"),
        ({"STOP_TIMEOUT": "-5"}, "launch: error: STOP_TIMEOUT=-5 is not a whole number"),
        ({"STOP_TIMEOUT": "0"}, "launch: error: STOP_TIMEOUT=0 must be at least 1 (seconds)"),
    ],
    ids=["restarts", "stop-timeout", "stop-timeout-zero"],
)
def test_bad_supervisor_settings(tmp_path, train_shards, bert_tokenizer, env, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\n")
    result = node(0, hostfile, tmp_path / "run", train_shards, bert_tokenizer, 29500, start=subprocess.run, env=env)
    assert result.returncode == 2
    assert result.stderr == message + "\n"
    assert not (tmp_path / "run").exists()
