"""What stops a training run cleanly: a stop signal to a rank, or the end of its launcher.

Either way the rank only records the request; the step in flight finishes, every rank sees
the request in the step's all-reduce, they save one checkpoint together and exit 0.

- Signals (`train.stop_signals`: SIGTERM, SIGUSR1 and SIGINT by default). Ctrl-C reaches
  every process of the terminal's group, the ranks included, so it saves like SIGTERM; a
  second Ctrl-C interrupts at once (a KeyboardInterrupt, nothing saved).
- The launcher's end. DeepSpeed's runner (the `deepspeed` command) installs no signal
  handler when it runs one node: SIGTERM to it, as `kill` or a scheduler sends, ends it at
  once and leaves launch.py and the ranks training as orphans. A rank therefore notes, at
  its start, the chain of launcher processes above it (launch.py, the runner, torchrun,
  `pipeline.train.supervise`) and treats any break in that chain (a launcher that ended, so that
  its child was re-parented) as a stop request. A rank started from a shell or by a
  scheduler directly watches nothing: closing a `nohup` terminal must not stop training.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

# How a launcher appears in its command line: a module run with -m, or a script's name.
LAUNCHER_MODULES = {
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
    "torch.distributed.run",
    "pipeline.supervise",
    "pipeline.train.supervise",
}
LAUNCHER_SCRIPTS = {"deepspeed", "torchrun"}


class StopRequest:
    """The run's stop request: a signal's name, "launcher ended", or None."""

    reason: str | None = None
    _launchers: list[int] = []

    @classmethod
    def install(cls, signal_names: list[str]) -> None:
        cls.reason = None
        for name in signal_names:
            signal.signal(getattr(signal, name), cls._handle)
        cls._launchers = launcher_chain(os.getpid())

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.reason = cls.reason or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C interrupts

    @classmethod
    def requested(cls) -> bool:
        """Whether this rank asks to stop: a stop signal came, or a launcher above it ended."""
        if cls.reason is None and cls._launchers and not chain_intact(os.getpid(), cls._launchers):
            cls.reason = "launcher ended"
        return cls.reason is not None


def launcher_chain(pid: int) -> list[int]:
    """The pids of the launcher processes directly above `pid`, nearest first."""
    chain = []
    try:
        parent = psutil.Process(pid).parent()
        while parent is not None and is_launcher(parent.cmdline()):
            chain.append(parent.pid)
            parent = parent.parent()
    except psutil.Error:
        pass  # an ancestor ended while we looked: the chain up to it is what there is to watch
    return chain


def chain_intact(pid: int, chain: list[int]) -> bool:
    """Whether each process of `chain` is still the parent of the one below it. A process whose
    parent ends is re-parented at once (the parent may linger as a zombie; pids may be reused,
    but a re-parented process never gets its old parent back)."""
    try:
        for child, parent in zip([pid, *chain], chain):
            if psutil.Process(child).ppid() != parent:
                return False
    except psutil.NoSuchProcess:
        return False
    return True


def is_launcher(cmdline: list[str]) -> bool:
    modules = {cmdline[i + 1] for i, arg in enumerate(cmdline[:-1]) if arg in ("-m", "-um")}
    scripts = {Path(arg).name for arg in cmdline[:2]}
    alum_supervise = any(Path(a).name == "alum" for a in cmdline[:2]) and "supervise" in cmdline[1:3]
    return bool(modules & LAUNCHER_MODULES or scripts & LAUNCHER_SCRIPTS or alum_supervise)
