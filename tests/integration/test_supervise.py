"""pipeline.train.supervise: pre-emption, relaunch after a failure, and no process left behind.

The training tests launch `launch/node.sh` (one node, two ranks: the supervisor is the
script's pid, as a scheduler sees it) and compare with the uninterrupted 2-rank reference
run. The others run small stand-in jobs to check the supervisor's own rules quickly.
"""

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
from helpers import REPO, RUN, comparable, pretrain_args, read_metrics, run_alum

from pipeline.train.distributed import free_port

pytestmark = pytest.mark.slow

SUPERVISE = [sys.executable, "-m", "pipeline.supervise"]


class Launch:
    """`launch/node.sh` on a one-node hostfile, its output in files that can be read while it runs."""

    def __init__(self, tmp_path: Path, run_dir: Path, shards: Path, tokenizer: Path, *extra: str, restarts: int = 0):
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        self.stdout, self.stderr = (
            tmp_path / f"{run_dir.name}-{time.monotonic_ns()}.{kind}" for kind in ("out", "err")
        )
        self.port = free_port()
        env = {
            **os.environ,
            "HOSTFILE": str(hostfile),
            "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.port),
            "RESTARTS": str(restarts),
            "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO),
            "WANDB_SILENT": "true",
        }
        command = ["bash", str(REPO / "launch" / "node.sh"), *pretrain_args(run_dir, shards, tokenizer, *RUN, *extra)]
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def rank(self, local_rank: int) -> psutil.Process:
        return next(p for p in descendants(self.process.pid) if f"--local_rank={local_rank}" in _cmdline(p))

    def wait_until(self, condition, timeout: float = 300) -> float:
        """Poll `condition` while the launch runs; the time it became true."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, (
                f"the launch ended first (exit {self.process.returncode}):\n{self.output()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"timed out:\n{self.output()[-3000:]}"
            time.sleep(0.02)
        return time.monotonic()


@pytest.fixture
def launches():
    """Launches a test starts; whatever still runs when it ends is killed (a failed test leaves nothing)."""
    started = []
    yield started
    for launch in started:
        process = launch.process if isinstance(launch, Launch) else launch
        if process.poll() is None:
            tree = descendants(process.pid)
            process.kill()
            process.wait()
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    p.kill()


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (is_running also tells a reused pid apart)."""
    left = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
    return left


def _cmdline(p: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return p.cmdline()
    return []


def metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_sigterm_to_the_supervisor_saves_exits_zero_and_resumes_exactly(
    reference, tmp_path, train_shards, bert_tokenizer, launches
):
    _, uninterrupted = reference
    run_dir = tmp_path / "preempted"
    launch = Launch(tmp_path, run_dir, train_shards, bert_tokenizer)
    launches.append(launch)
    launch.wait_until(lambda: metrics_lines(run_dir) >= 2)
    job = descendants(launch.process.pid)
    signalled = time.monotonic()
    launch.process.send_signal(signal.SIGTERM)
    returncode = launch.process.wait(timeout=300)
    seconds = time.monotonic() - signalled
    print(f"SIGTERM to exit: {seconds:.1f} s")
    output = launch.output()
    assert returncode == 0, output[-3000:]  # within the wait's 300 s: timings are printed, not asserted
    # The ranks got the signal themselves; DeepSpeed's launch.py saw them exit 0 and killed nothing.
    assert "stop requested (SIGTERM): saved step" in output and "Killing subprocess" not in output
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 2 <= stopped_at < 8
    assert latest(run_dir) == f"step{stopped_at:08d}"
    assert alive(job) == []

    relaunch = Launch(tmp_path, run_dir, train_shards, bert_tokenizer)
    launches.append(relaunch)
    assert relaunch.process.wait(timeout=600) == 0, relaunch.output()[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step{stopped_at:08d}" in relaunch.output()
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(uninterrupted))


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_a_killed_rank_is_relaunched_and_resumes_exactly(reference, tmp_path, train_shards, bert_tokenizer, launches):
    _, uninterrupted = reference
    run_dir = tmp_path / "crashed"
    checkpoints = run_dir / "checkpoints"
    launch = Launch(tmp_path, run_dir, train_shards, bert_tokenizer, restarts=1)
    launches.append(launch)
    launch.wait_until((checkpoints / "step00000004" / "complete.json").exists)
    first_attempt = descendants(launch.process.pid)
    launch.rank(1).kill()
    killed = time.monotonic()
    assert not (checkpoints / "step00000008" / "complete.json").exists(), "killed too late to test resume"

    relaunched = launch.wait_until(lambda: "supervise: attempt 2 of 2" in launch.stderr.read_text())
    print(f"kill -9 of rank 1 to the relaunch: {relaunched - killed:.1f} s")
    assert alive(first_attempt) == []  # the old launch is gone before the new one starts
    returncode = launch.process.wait(timeout=600)
    output = launch.output()
    assert returncode == 0, output[-3000:]
    assert output.count("supervise: attempt 2 of 2: the job exited with ") == 1
    assert "relaunching, it resumes from the latest complete checkpoint" in output
    assert f"resumed from {checkpoints}/step00000004 (step 4)" in output
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(uninterrupted))
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM a rank) are gone, even the killed attempt's.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{launch.port}_*"))


def test_a_bad_input_is_not_retried(tmp_path, train_shards, bert_tokenizer, launches):
    launch = Launch(tmp_path, tmp_path / "run", train_shards, bert_tokenizer, "train.no_such_key=1", restarts=3)
    launches.append(launch)
    assert launch.process.wait(timeout=300) == 2
    errors = launch.stderr.read_text()
    assert errors.count("pretrain: error:") == 1 and "train.no_such_key" in errors
    assert (
        "supervise: the job exited with 2 (a bad input: relaunching would fail the same way); not relaunching" in errors
    )
    assert "attempt 2" not in errors


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["zero2"])
def test_sigusr1_to_every_process_of_the_job_still_saves(reference, tmp_path, train_shards, bert_tokenizer, launches):
    """What SLURM's --signal does with cgroup process tracking: the launchers, which do not
    handle SIGUSR1, inherit it ignored from the supervisor and wait for the saving ranks."""
    run_dir = tmp_path / "signalled"
    launch = Launch(tmp_path, run_dir, train_shards, bert_tokenizer)
    launches.append(launch)
    launch.wait_until(lambda: metrics_lines(run_dir) >= 2)
    job = descendants(launch.process.pid)
    for p in [psutil.Process(launch.process.pid), *job]:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGUSR1)
    returncode = launch.process.wait(timeout=300)
    output = launch.output()
    assert returncode == 0, output[-3000:]
    assert "stop requested (SIGUSR1): saved step" in output
    assert latest(run_dir) == f"step{read_metrics(run_dir)[-1]['step']:08d}"
    assert alive(job) == []


# Stand-in jobs: the supervisor's rules without training.

COUNTING_JOB = """
import pathlib, sys
counter = pathlib.Path(sys.argv[1])
attempt = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(attempt))
sys.exit(0 if attempt >= int(sys.argv[2]) else 1)
"""


@pytest.mark.parametrize(
    "succeeds_on, restarts, expected", [(3, 3, 0), (3, 1, 1)], ids=["succeeds", "restarts-used-up"]
)
def test_failures_are_relaunched_up_to_restarts(tmp_path, succeeds_on, restarts, expected):
    counter = tmp_path / "attempts"
    result = run_alum(
        "supervise",
        "--restarts",
        str(restarts),
        "--backoff",
        "0",
        "--",
        sys.executable,
        "-c",
        COUNTING_JOB,
        counter,
        str(succeeds_on),
    )
    assert result.returncode == expected
    attempts = min(succeeds_on, restarts + 1)
    assert counter.read_text() == str(attempts)
    lines = result.stderr.splitlines()
    relaunches = [
        f"supervise: attempt {n} of {restarts + 1}: the job exited with 1; relaunching, it resumes from the latest "
        "complete checkpoint"
        for n in range(2, attempts + 1)
    ]
    if expected:
        relaunches.append(
            f"supervise: the job exited with 1 on attempt {attempts} of {attempts}; not relaunching (--restarts "
            f"{restarts})"
        )
    assert lines == relaunches


def test_a_job_killed_by_a_signal_exits_128_plus_the_signal():
    result = subprocess.run(
        [*SUPERVISE, "--", "sh", "-c", "kill -9 $$"], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 137
    assert (
        result.stderr == "supervise: the job was killed by SIGKILL on attempt 1 of 1; not relaunching (--restarts 0)\n"
    )


def test_a_signal_before_any_rank_stops_the_launcher_and_leaves_nothing(launches):
    # A "launcher" with a child in a session of its own, as W&B's service runs.
    launcher = "import subprocess, time; subprocess.Popen(['sleep', '300'], start_new_session=True); time.sleep(300)"
    process = subprocess.Popen([*SUPERVISE, "--", sys.executable, "-c", launcher], stderr=subprocess.PIPE, text=True)
    launches.append(process)
    deadline = time.monotonic() + 60
    while len(job := descendants(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert errors == "supervise: SIGINT before any training process started (nothing to save): stopping the launcher\n"
    assert len(job) == 2 and alive(job) == []


def test_a_rank_that_does_not_stop_is_killed_after_the_stop_timeout(tmp_path, launches):
    # A stand-in rank (its program is pipeline/train/pretrain.py) that handles SIGTERM but never stops,
    # with a child in a session of its own.
    rank, ready = tmp_path / "pipeline" / "pretrain.py", tmp_path / "ready"
    rank.parent.mkdir()
    rank.write_text(
        "import pathlib, signal, subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('ignoring SIGTERM', flush=True))\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "time.sleep(300)\n"
    )
    process = subprocess.Popen(
        [*SUPERVISE, "--stop-timeout", "2", "--", sys.executable, str(rank), str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    launches.append(process)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    job = descendants(process.pid)
    rank_pid = _pid_of(job, str(rank))
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, errors = process.communicate(timeout=60)
    assert process.returncode == 1 and time.monotonic() - signalled < 30
    assert out == "ignoring SIGTERM\n"
    assert errors.splitlines() == [
        f"supervise: SIGTERM: asked 1 of 1 training process(es) (pids {rank_pid}) to save a checkpoint and stop",
        "supervise: the job did not stop within 2 s of SIGTERM; killed it (the latest complete checkpoint is intact)",
    ]
    assert len(job) == 2 and alive(job) == []


def test_ranks_that_saved_before_the_supervisor_looked_leave_the_launcher_to_finish(tmp_path, launches):
    """The race a scheduler's signal to every process can cause: the ranks save and exit
    before the supervisor handles its own copy; the launcher, still tidying up, must not be
    stopped as if nothing had run (CI saw exit 138 there)."""
    rank, ready = tmp_path / "pipeline" / "pretrain.py", tmp_path / "ready"
    rank.parent.mkdir()
    rank.write_text(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "time.sleep(300)\n"
    )
    launcher = (
        f"import subprocess, sys, time; code = subprocess.call([sys.executable, {str(rank)!r}, {str(ready)!r}]); "
        "time.sleep(3); sys.exit(code)"
    )
    process = subprocess.Popen([*SUPERVISE, "--", sys.executable, "-c", launcher], stderr=subprocess.PIPE, text=True)
    launches.append(process)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # the supervisor has seen the rank
    job = descendants(process.pid)
    rank_process = psutil.Process(_pid_of(job, str(rank)))
    rank_process.send_signal(signal.SIGUSR1)
    rank_process.wait(timeout=30)
    process.send_signal(signal.SIGUSR1)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert errors == ""
    assert alive(job) == []


def _pid_of(processes: list[psutil.Process], program: str) -> int:
    return next(p.pid for p in processes if program in _cmdline(p))


def test_usage_errors():
    result = subprocess.run([*SUPERVISE, "--restarts", "1"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "error: no command: put it after --" in result.stderr
    result = subprocess.run(
        [*SUPERVISE, "--", "no-such-launcher"], check=False, capture_output=True, text=True, timeout=60
    )
    assert (
        result.returncode == 127
        and result.stderr == "supervise: cannot run no-such-launcher: No such file or directory\n"
    )
