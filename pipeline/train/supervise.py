"""Supervise a training launch: `python -m pipeline.supervise [--restarts N] [--stop-timeout S] -- COMMAND...`.

COMMAND starts this node's share of the job: DeepSpeed's runner, torchrun or
`python -m pipeline.pretrain` itself (the scripts in launch/ put it under the supervisor).
The supervisor exists because the launchers are what a scheduler signals, and they handle
it badly: DeepSpeed's runner dies on SIGTERM and leaves its launch.py running (the ranks
then stop as their launcher chain broke, pipeline.train.stop); launch.py SIGTERMs each rank's
whole process tree (W&B's service included), SIGKILLs it 30 s later and exits 1. The ranks
stop well on their own: a stop signal to any rank makes every rank save one checkpoint at
the next step boundary and exit 0. Hence:

- Pre-emption. COMMAND runs in a session of its own, and SIGTERM, SIGUSR1 or SIGINT to the
  supervisor goes to the training ranks only (SIGINT as SIGTERM, which a
  `train.stop_signals` without SIGINT still lists).
  The launcher sees the ranks exit 0 and exits 0, and so does the supervisor, without
  relaunching. The launchers inherit SIGUSR1 ignored, so a scheduler that signals every
  process of the job (SLURM's `--signal`) does not kill them under the saving ranks.
- A signal that comes before any rank runs (nothing to save yet) stops the launcher with
  SIGTERM, and the supervisor exits 128+signum, as it does when the job fails after the
  signal. A job still running `--stop-timeout` seconds after the signal is killed: exit 1.
  A stopped job is never relaunched.
- Failures. A job that exits non-zero is relaunched up to `--restarts` times, `--backoff`
  seconds later (it resumes from the latest complete checkpoint), except for exit codes 2
  (a bad input) and 3 (the loss stayed non-finite), which a relaunch would only repeat.
  Then the supervisor exits with the job's last exit code.
- Nothing is left behind: before a relaunch and before the supervisor exits, whatever the
  job started is killed (its process group, then every descendant: on Linux the supervisor
  is a subreaper, so the orphans of a launcher that died are its descendants too).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psutil

from pipeline.core.help_format import DefaultsHelpFormatter

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Exit codes of pipeline.train.pretrain that a relaunch would only repeat.
FINAL = {
    2: "a bad input: relaunching would fail the same way",
    3: "the loss stayed non-finite: a relaunch would resume from the same checkpoint and diverge again",
}
POLL_S = 0.2
FORWARD_EVERY_S = 1.0  # while stopping: ranks still starting up get the stop once they handle it
KILL_TIMEOUT_S = 30.0
PR_SET_CHILD_SUBREAPER = 36


class Signals:
    """Stop signals the supervisor received; the handler only records them, the loop acts."""

    pending: ClassVar[list[int]] = []

    @classmethod
    def install(cls) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.pending.append(signum)

    @classmethod
    def take(cls) -> int | None:
        return cls.pending.pop(0) if cls.pending else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.supervise", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--restarts", type=int, default=0, help="relaunch a failed job up to N times (default 0)")
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=600.0,
        help="seconds the ranks get to save and exit after a stop signal before the job is killed (default 600)",
    )
    parser.add_argument(
        "--backoff", type=float, default=2.0, help="seconds between a failure and the relaunch (default 2)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launch command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: put it after --, e.g. -- deepspeed --module pipeline.pretrain --config ...")
    if args.restarts < 0 or args.stop_timeout <= 0 or args.backoff < 0:
        parser.error("--restarts and --backoff must be >= 0 and --stop-timeout > 0")
    Signals.install()
    _become_subreaper()
    return Supervisor(command, args.restarts, args.stop_timeout, args.backoff).run()


@dataclass
class Supervisor:
    """Launches COMMAND until it succeeds, is stopped by a signal, fails for good or runs out of restarts."""

    command: list[str]
    restarts: int
    stop_timeout: float
    backoff: float

    def run(self) -> int:
        attempts, attempt = self.restarts + 1, 1
        while True:
            try:
                job = Job(self.command, self.stop_timeout)
            except OSError as e:
                say(f"cannot run {self.command[0]}: {e.strerror}")
                return 127
            try:
                returncode = job.wait()
            finally:
                job.end()
            if job.stop is not None:
                return job.stopped(returncode)
            status = exit_status(returncode)
            if status == 0:
                return 0
            if status in FINAL:
                say(f"the job {describe(returncode)} ({FINAL[status]}); not relaunching")
                return status
            if attempt == attempts:
                say(
                    f"the job {describe(returncode)} on attempt {attempt} of {attempts}; not relaunching (--restarts "
                    f"{self.restarts})"
                )
                return status
            attempt += 1
            say(
                f"attempt {attempt} of {attempts}: the job {describe(returncode)}; relaunching, it resumes from the "
                "latest complete checkpoint"
            )
            signum = _pause(self.backoff)
            if signum is not None:
                say(f"{signal.Signals(signum).name} before the relaunch; not relaunching")
                return 128 + signum


class Job:
    """One launch of COMMAND, in a session of its own so that signals meant for the
    supervisor (a terminal's Ctrl-C, a scheduler signalling a process group) do not reach
    the launchers, and so that the whole launch can be killed as one process group."""

    def __init__(self, command: list[str], stop_timeout: float):
        self.stop_timeout = stop_timeout
        self.stop: int | None = None  # the first stop signal received
        self.asked: set[int] = set()  # training ranks the stop was sent to
        self.launcher_stopped = False  # no rank was running: the launcher got SIGTERM
        self.ranks_seen = False  # a training rank has run: no rank now means they are done
        self.deadline = math.inf
        self.next_forward = math.inf
        # preexec_fn is unsafe only with threads, and the supervisor has none.
        self.process = subprocess.Popen(command, start_new_session=True, preexec_fn=_ignore_sigusr1)  # noqa: PLW1509

    def wait(self) -> int | None:
        """The job's return code once it is over; None if it outlived --stop-timeout after a stop signal."""
        while True:
            # Signals first: a scheduler that signals every process of the job can kill the
            # launcher before the supervisor looks, and that is a stop, not a failure.
            if not self.ranks_seen:
                self.ranks_seen = bool(training_processes())
            self._handle_signals()
            if self._over():
                return self.process.returncode
            if time.monotonic() > self.deadline:
                return None
            time.sleep(POLL_S)

    def _over(self) -> bool:
        """The launcher exited and, after a stop was forwarded, so did the ranks: a launcher
        killed by a signal the scheduler sent to every process can leave ranks still saving."""
        if self.process.poll() is None:
            return False
        return not self.asked or not training_processes()

    def _handle_signals(self) -> None:
        signum = Signals.take()
        while Signals.take() is not None:
            pass  # the first stop signal decides; later ones change nothing
        if signum is not None and self.stop is None:
            self.stop, self.deadline = signum, time.monotonic() + self.stop_timeout
            self._forward()
        elif self.stop is not None and not self.launcher_stopped and time.monotonic() >= self.next_forward:
            self._forward()

    def _forward(self) -> None:
        """Send the stop to each training rank once, as soon as it catches the signal: a rank
        still starting up has no stop handler yet (SIGTERM would kill it, SIGUSR1 is ignored),
        and one already exiting has given its handler up (Python restores the default
        handlers while it shuts down). With no rank yet there is nothing to save: the
        launcher gets SIGTERM. Ranks that have come and gone (a scheduler that signals every
        process reaches them first, and they may have saved and exited before the supervisor
        looks) leave the launcher to exit with their status."""
        self.next_forward = time.monotonic() + FORWARD_EVERY_S
        name, signum = signal.Signals(self.stop).name, signal.SIGTERM if self.stop == signal.SIGINT else self.stop
        ranks = training_processes()
        if not ranks and not self.asked and not self.ranks_seen and not self.launcher_stopped:
            say(f"{name} before any training process started (nothing to save): stopping the launcher")
            _send([self.process], signal.SIGTERM)
            self.launcher_stopped = True
            return
        ready = [p for p in ranks if p.pid not in self.asked and _catches(p.pid, signum)]
        _send(ready, signum)
        if ready and not self.asked:
            say(
                f"{name}: asked {len(ready)} of {len(ranks)} training process(es) "
                f"(pids {', '.join(str(p.pid) for p in ready)}) "
                "to save a checkpoint and stop"
            )
        self.asked |= {p.pid for p in ready}

    def stopped(self, returncode: int | None) -> int:
        """The supervisor's exit code after a stop signal: 0 when the ranks stopped cleanly."""
        name = signal.Signals(self.stop).name
        if returncode is None:
            say(
                f"the job did not stop within {self.stop_timeout:g} s of {name}; killed it (the latest complete "
                "checkpoint is intact)"
            )
            return 1
        if returncode == 0 and not self.launcher_stopped:
            return 0  # the ranks saved a checkpoint (or had just finished)
        if not self.launcher_stopped:
            say(f"the job {describe(returncode)} after {name}; not relaunching")
        return 128 + self.stop

    def end(self) -> None:
        """SIGKILL whatever is left of the launch and reap it: a failed launcher can leave
        ranks (and W&B services, which run in sessions of their own) that would hold the
        accelerators and the rendezvous port against a relaunch."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        kill_descendants()


def training_processes() -> list[psutil.Process]:
    """The training ranks among the supervisor's descendants: Python processes whose program
    is pipeline.train.pretrain (`-m pipeline.pretrain`, `alum pretrain`), not forked from one.

    The program, not any mention on the command line: the launchers (DeepSpeed's runner and
    launch.py, torchrun) name pipeline.train.pretrain in their arguments, and must not get a stop
    meant for the ranks, also after the ranks have exited. A worker a rank forks has the
    rank's command line, and is left to its rank.
    """
    procs = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            procs[p.pid] = (p, p.ppid(), p.cmdline())
    training = {pid for pid, (_, _, cmdline) in procs.items() if _runs_pretrain(cmdline)}
    forked = {pid for pid in training if procs[pid][1] in training and procs[procs[pid][1]][2] == procs[pid][2]}
    return [procs[pid][0] for pid in sorted(training - forked)]


def _runs_pretrain(cmdline: list[str]) -> bool:
    if not cmdline or "python" not in os.path.basename(cmdline[0]):
        return False
    program, args = _python_program(cmdline[1:])
    if program in ("pipeline.pretrain", "pipeline.train.pretrain") or program.endswith(
        os.path.join("pipeline", "pretrain.py")
    ):
        return True
    return (program == "pipeline.cli" or os.path.basename(program) == "alum") and args[:1] == ["pretrain"]


def _python_program(args: list[str]) -> tuple[str, list[str]]:
    """(module or script, its arguments) of a Python interpreter's arguments."""
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-", "-c"):
        if args[i] == "-m":
            return (args[i + 1], args[i + 2 :]) if i + 1 < len(args) else ("", [])
        if args[i].startswith("-m"):
            return args[i][2:], args[i + 1 :]
        i += 2 if args[i] in ("-W", "-X", "--check-hash-based-pycs") else 1
    return (args[i], args[i + 1 :]) if i < len(args) else ("", [])


def kill_descendants() -> None:
    """SIGKILL and reap every descendant, until none is left (bounded: one stuck in the
    kernel, e.g. on a hung filesystem, cannot die; it is named)."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while left := psutil.Process().children(recursive=True):
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        _reap_children()
        if time.monotonic() > deadline:
            say(f"could not kill pids {', '.join(str(p.pid) for p in left)} within {KILL_TIMEOUT_S:g} s")
            return
        time.sleep(0.02)


def _reap_children() -> None:
    """Collect the exit status of dead children (orphans adopted as subreaper among them)."""
    for child in psutil.Process().children():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)


def _send(processes, signum: int) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            p.send_signal(signum)


def _pause(seconds: float) -> int | None:
    """Wait between attempts; a stop signal ends the wait (and is returned)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        signum = Signals.take()
        if signum is not None:
            return signum
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    return Signals.take()


def _catches(pid: int, signum: int) -> bool:
    """Whether a process has a handler for the signal (Linux: the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/status").exists()  # no /proc: assume it does
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signum - 1) & 1)


def _ignore_sigusr1() -> None:
    """Runs in the child before exec: an ignored signal stays ignored across exec, so the
    launchers (which do not handle SIGUSR1) survive a SIGUSR1 sent to every process of the
    job, and the ranks, which install their own handler, still stop on it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _become_subreaper() -> None:
    """On Linux, make the job's orphans children of the supervisor instead of init: a
    launcher that dies leaves its ranks to be waited for (and killed) here."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def exit_status(returncode: int) -> int:
    """A shell's exit status for a return code (killed by signal N: 128+N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with {returncode}"


def say(line: str) -> None:
    print(f"supervise: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
