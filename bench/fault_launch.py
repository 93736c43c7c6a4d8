"""One launch of a training job, watched from outside: `deepspeed --num_gpus N --module
pipeline.pretrain ARGS` in a session of its own, its output read as it comes, its processes
recorded so that a kill can be aimed and anything left behind named."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil
from run_files import read_metrics
from tiny_run import launch_command

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^step (\d+)/(\d+) \|")


class Launch:
    """`deepspeed --num_gpus N --module pipeline.pretrain ARGS` in a new session.

    A thread reads its output (kept in `log`), noting rank 0's progress lines; the processes
    of the job are recorded whenever the harness looks at them, so that any one still alive
    after the launcher exits can be named.
    """

    def __init__(self, args: list[str], log: Path, world: int = 2):
        from pipeline.train.distributed import (
            free_port,
        )  # imports DeepSpeed: not at import, which the tests do at collection

        self.port = free_port()
        command = [*launch_command("deepspeed", world, self.port), *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
        self.log_path = Path(log)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.pgid = self.process.pid
        self.lines: list[str] = []
        self.steps: list[tuple[float, int]] = []  # (monotonic time, step) of each progress line
        self.seen: dict[int, psutil.Process] = {}
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._last_look = 0.0
        self.reaped_at: float | None = (
            None  # wall time the launcher was reaped (its pid, the group's id, is free from then)
        )
        self.shm_removed = (0, 0)  # (files, bytes) of DeepSpeed's shared-memory buffers removed by close()

    def poll(self) -> int | None:
        """The launcher's exit code, or None while it runs."""
        code = self.process.poll()
        if code is not None and self.reaped_at is None:
            self.reaped_at = time.time()
        return code

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                match = PROGRESS.match(line)
                with self._changed:
                    self.lines.append(line)
                    if match:
                        self.steps.append((time.monotonic(), int(match.group(1))))
                    self._changed.notify_all()

    def look(self, force: bool = False) -> None:
        """Record the job's processes (at most every 0.5 s unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_look < 0.5:
            return
        self._last_look = now
        try:
            root = psutil.Process(self.process.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in found:
            self.seen.setdefault(p.pid, p)

    def ranks(self) -> dict[int, psutil.Process]:
        """Local rank -> its process."""
        self.look(force=True)
        ranks = {}
        for p in self.seen.values():
            try:
                cmdline = p.cmdline()
            except psutil.Error:
                continue
            if "pipeline.pretrain" in cmdline and "-m" in cmdline:
                for arg in cmdline:
                    if arg.startswith("--local_rank="):
                        ranks[int(arg.split("=", 1)[1])] = p
        return ranks

    @property
    def last_step(self) -> int | None:
        return self.steps[-1][1] if self.steps else None

    def wait_for(self, condition, timeout: float) -> bool:
        """Wait until `condition()` holds (True) or the launcher exits or time runs out (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                if self.poll() is not None or time.monotonic() > deadline:
                    return condition()
                self._changed.wait(0.05)
                self.look()
        return True

    def wait_for_step(self, step: int, timeout: float) -> bool:
        return self.wait_for(lambda: self.last_step is not None and self.last_step >= step, timeout)

    def step_seconds(self, run_dir: Path) -> float:
        """The last logged step's duration (`perf/step_seconds`), else the gap between progress lines."""
        for record in reversed(read_metrics(run_dir)):
            if record["step"] == self.last_step and isinstance(record.get("perf/step_seconds"), float):
                return record["perf/step_seconds"]
        gaps = [b[0] - a[0] for a, b in zip(self.steps, self.steps[1:])]
        return statistics.median(gaps[-3:]) if gaps else 0.2

    def kill_group(self) -> None:
        """SIGKILL the job's process group (only while the launcher is unreaped, so the id is still ours)."""
        if self.poll() is None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def alive(self) -> list[psutil.Process]:
        """Processes of this job still running (zombies count as gone)."""
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        # Also anything in the job's process group that was never seen; once the launcher is
        # reaped its id may name another group, so only processes older than that or
        # children of the job's processes count.
        for p in psutil.process_iter():
            try:
                if p.pid in self.seen or os.getpgid(p.pid) != self.pgid or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if self.reaped_at is None or p.create_time() < self.reaped_at or p.ppid() in self.seen:
                    alive.append(p)
            except (psutil.Error, OSError):
                pass
        return alive

    def finish(self, timeout: float) -> int | None:
        """Wait for the launcher to exit; None if it did not within `timeout`."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.poll()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def close(self) -> None:
        """Make sure nothing of the job is left, and stop reading its output."""
        self.kill_group()
        for p in self.alive():
            try:
                p.kill()
            except psutil.Error:
                pass
        self.finish(10)
        self._reader.join(5)
        if not self.alive():
            self.shm_removed = self._remove_shm()

    def _remove_shm(self) -> tuple[int, int]:
        """Unlink the job's /dev/shm all-reduce buffers (files, bytes).

        DeepSpeed's CPU all-reduce (`deepspeed_shm_comm`) gives every rank a 64 MiB segment
        named after the master address and port and never unlinks it; pretrain does, right
        after start-up, so any found here is a regression (they would pile up in RAM).
        """
        files = total = 0
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{self.port}_*"):
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            files, total = files + 1, total + size
        return files, total

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """Wait up to `timeout` for every process of the job to end; those still running."""
        deadline = time.monotonic() + timeout
        while (alive := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return alive


def describe(p: psutil.Process) -> str:
    """A process in a report line: its pid and the start of its command line."""
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return str(p.pid)
