"""Stopping a run the obvious ways (pipeline.train.stop): a signal to the `deepspeed` command, Ctrl-C,
and a launcher that dies. Each launch is the real DeepSpeed launcher with 2 CPU ranks, in a
session of its own, as a terminal's job is; the stopped run must equal the uninterrupted
reference run up to the step it saved, and nothing of it may be left running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO, RUN, comparable, launch_command, pretrain, pretrain_args, read_metrics

from pipeline.train.distributed import free_port
from pipeline.train.stop import chain_intact, is_launcher, launcher_chain


class Job:
    """`deepspeed --num_gpus 2 --module pipeline.pretrain` in its own session, output in a file."""

    def __init__(self, run_dir: Path, shards: Path, tokenizer: Path):
        self.run_dir, self.log = run_dir, run_dir.with_suffix(".log")
        command = launch_command("deepspeed", 2, free_port()) + pretrain_args(run_dir, shards, tokenizer, *RUN)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
        }  # W&B not silenced: its lines are counted
        with open(self.log, "w") as out:
            self.runner = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text()

    def training(self) -> list[psutil.Process]:
        """The launcher's processes once two steps are logged: launch.py and the ranks."""
        deadline = time.monotonic() + 300
        while not ((self.run_dir / "metrics.jsonl").exists() and len(read_metrics(self.run_dir)) >= 2):
            assert self.runner.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.02)
        return psutil.Process(self.runner.pid).children(recursive=True)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.runner.pid, signal.SIGKILL)
        self.runner.wait()


@pytest.fixture
def training_job(reference, tmp_path, train_shards, bert_tokenizer):
    """A job two steps into training, its launcher's processes, and the uninterrupted reference
    run's directory; whatever of it still runs when the test ends is killed."""
    job = Job(tmp_path / "run", train_shards, bert_tokenizer)
    try:
        yield job, job.training(), reference[1]
    finally:
        job.kill()
        for p in psutil.process_iter(["cmdline"]):  # ranks that outlived their launcher
            if str(job.run_dir) in " ".join(p.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    p.kill()


def stopped(job: Job, tree: list[psutil.Process], reference: Path, reason: str) -> int:
    """The step the stopped job saved, after checking that it saved it, said why, matched the
    reference run up to it and left no process behind."""
    gone, alive = psutil.wait_procs(tree, timeout=300)
    output = job.output()
    assert alive == [], output[-3000:]
    line = next(
        (line for line in output.splitlines() if line.startswith(f"stop requested ({reason}): saved step ")), None
    )
    assert line is not None, output[-3000:]
    step = int(line.split("saved step ")[1].split(";")[0])
    assert 2 <= step < 8
    assert (job.run_dir / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    assert comparable(read_metrics(job.run_dir)) == comparable(read_metrics(reference))[:step]
    assert "[rank0]" not in output and "[rank1]" not in output, output[-3000:]  # no rank's traceback
    return step


@pytest.mark.slow
@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_sigterm_to_the_deepspeed_command_saves_stops_every_rank_and_resumes_exactly(
    training_job, train_shards, bert_tokenizer
):
    # DeepSpeed's runner dies of the signal at once (it has no handler on one node); its ranks
    # see their launcher chain break, save together and exit 0 instead of training on as orphans.
    job, tree, uninterrupted = training_job
    job.runner.send_signal(signal.SIGTERM)
    assert job.runner.wait(timeout=60) == -signal.SIGTERM
    step = stopped(job, tree, uninterrupted, "launcher ended")
    lines = job.output().splitlines()
    # DeepSpeed's runner and launch.py log their accelerator; the ranks do not, nor the op load.
    assert sum("Setting accelerator to CPU" in line for line in lines) == 2
    assert not any("built successfully" in line for line in lines)
    assert lines.count("pretrain: 2 rank(s) on cpu (no GPU found), fp32, ZeRO stage 2") == 1
    said_by_wandb = [line for line in lines if line.startswith("wandb:")]
    assert len(said_by_wandb) <= 4, said_by_wandb  # where the run is kept, not W&B's 30-line summary
    assert said_by_wandb[-1].startswith("wandb: run ") and "`wandb sync " in said_by_wandb[-1]
    resumed = pretrain(job.run_dir, train_shards, bert_tokenizer, *RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {job.run_dir}/checkpoints/step{step:08d}" in resumed.stdout
    assert comparable(read_metrics(job.run_dir)) == comparable(read_metrics(uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_ctrl_c_saves_and_every_rank_exits_without_a_traceback(training_job):
    # A terminal's Ctrl-C: SIGINT to the whole foreground process group (runner, launch.py, ranks).
    # launch.py then SIGTERMs each rank's process tree, W&B's service included.
    job, tree, uninterrupted = training_job
    os.killpg(job.runner.pid, signal.SIGINT)
    stopped(job, tree, uninterrupted, "SIGINT")


@pytest.mark.slow
@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_ranks_whose_launcher_was_killed_save_and_stop(training_job):
    job, tree, uninterrupted = training_job
    launch_py = next(p for p in tree if "deepspeed.launcher.launch" in p.cmdline())
    launch_py.kill()  # no handler runs: the ranks are orphaned
    stopped(job, [p for p in tree if p.pid != launch_py.pid], uninterrupted, "launcher ended")


def test_launchers_are_recognised_by_their_command_line():
    python = sys.executable
    assert is_launcher([python, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="])
    assert is_launcher([python, "/venv/bin/deepspeed", "--num_gpus", "2", "--module", "pipeline.pretrain"])
    assert is_launcher([python, "/venv/bin/torchrun", "--nproc_per_node", "2", "-m", "pipeline.pretrain"])
    assert is_launcher([python, "-m", "pipeline.supervise", "--", "deepspeed"])
    assert is_launcher([python, "/venv/bin/alum", "supervise", "--restarts", "1", "--", "x"])
    assert not is_launcher(["/bin/bash", "train.sh", "deepspeed"])  # a shell script that runs a launcher
    assert not is_launcher([python, "-m", "pipeline.pretrain", "--run-dir", "deepspeed"])
    assert not is_launcher(["sshd: user@pts/0"])


def test_a_chain_breaks_when_a_process_in_it_ends(tmp_path):
    # sh (a stand-in launcher) -> sleep: intact while sh runs; broken once sh is killed and
    # sleep is re-parented, although sleep itself runs on.
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert chain_intact(child, [parent.pid])
        assert not chain_intact(child, [os.getpid()])
        assert launcher_chain(os.getpid()) == []  # pytest is no launcher
        parent.kill()
        parent.wait()
        assert psutil.Process(child).is_running()
        assert not chain_intact(child, [parent.pid])
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(child).kill()
