"""Fault injection: kill a 2-rank training run at seeded random points, resume it each time, check nothing was lost.

One uninterrupted 2-rank run (the reference) and one faulted run of the same config, both
launched as users do (`deepspeed --num_gpus 2 --module pipeline.pretrain ...`, each launch
in its own session). A seeded RNG draws the faults, each a step at which to strike and a kind:

- `kill-group`: once the launch has logged the step, wait a random fraction of a step and
  SIGKILL the launcher's whole process group (the node dies, or `kill -9` of the job);
- `kill-rank`: the same, but SIGKILL one rank only (a random local rank): the launcher has to
  notice the dead rank and bring the job down by itself;
- `kill-in-save`: once the launch has logged the step, poll every 2 ms for the next checkpoint
  directory to appear without `complete.json`, and SIGKILL the process group part-way
  through the save (a random fraction of the first half of what earlier saves took).

The run: `configs/tiny.yaml` with the tests' settings (tests/conftest.py), ZeRO-2, W&B off,
16 steps of 16 samples, ALUM from step 8, a checkpoint every 3 steps (so that kills land
between checkpoints as well as in saves); `--set key=value` changes any of it.

After each fault the harness waits for the job to end (and measures how long that takes),
makes sure no process of it is left (killing the group if one is), relaunches the same
command on the same run directory and goes on to the next fault; after the last one the run
finishes. A relaunch *resumed* when it printed `resumed from .../stepNNNNNNNN (step N)` with
N the newest complete checkpoint on disk after the fault (or, with none yet, started again
from step 1); when the fault left a partial checkpoint the relaunch must also name it in a
line about a "partial checkpoint".

The report: faults injected by kind; relaunches that resumed; steps lost to recomputation
per fault and in total (the last step logged before the fault minus the step resumed from);
seconds from the fault to the job's exit; processes left behind; and, comparing the faulted
run's final `metrics.jsonl` with the reference step by step (`data/sample_digest`,
`data/consumed_samples`, `train/loss`), samples skipped or repeated (a step missing,
repeated or with another digest counts `train.global_batch_size` samples; must be 0) and
whether the metrics equal the reference exactly (wall-clock `perf/` keys left out). It exits
1 when samples were skipped or repeated, a relaunch did not resume, the faulted run did not
finish, or its metrics differ from the reference.

DeepSpeed's CPU all-reduce maps a 64 MiB segment per rank in /dev/shm (RAM) and never
unlinks it; `pipeline.pretrain` unlinks its own once every rank has mapped them, so a launch
leaves none, killed or not. The harness checks that: it counts (and removes) any its
launches left behind; the report must say 0.

The tokenizer (vocab 2000, WikiText-2 train) and shards (WikiText-2 valid, 64-token rows,
10% val) are built once into the work directory with the project's API, as the tests
do; `ALUM_SHARED_DATA` (or `--data`) names the data directory.

    python bench/fault_injection.py                                # 6 faults, seed 0: 16 steps, checkpoint every 3
    python bench/fault_injection.py --faults 9 --seed 3 --json faults.json
    python bench/fault_injection.py --tokenizer tok/ --shards shards/ --work-dir runs/faults --keep
    python bench/fault_injection.py --kinds kill-rank --faults 4   # one kind only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = ("kill-group", "kill-rank", "kill-in-save")
CONFIG = "configs/tiny.yaml"
# The tests' settings (tests/conftest.py: TRAIN_OVERRIDES and RUN), on a longer run with
# checkpoints every 3 steps so that kills land between checkpoints as well as in saves.
OVERRIDES = (
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.warmup_steps=2",
    "eval.batches=2",
    "wandb.mode=disabled",
    "adversarial.grad_eps=1e-12",
    "train.max_steps=16",
    "adversarial.method=alum",
    "adversarial.start_step=8",
    "adversarial.step_size=0.1",
    "adversarial.noise_std=0.01",
    "checkpoint.every_steps=3",
    "eval.every_steps=4",
)
PROGRESS = re.compile(r"^step (\d+)/(\d+) \|")
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)\)")
POLL = 0.002  # seconds between looks for a checkpoint being saved


def shared_data_dir() -> Path:
    value = os.environ.get("ALUM_SHARED_DATA")
    if not value:
        raise SystemExit("ALUM_SHARED_DATA is not set (or give --data): the test-data directory (wikitext-2/, ...)")
    return Path(value)


def prepare_data(out: Path, data_dir: Path | None = None) -> tuple[Path, Path]:
    """(tokenizer, shards) built in `out` once, as tests/conftest.py builds them; reused if there."""
    from data_prep.corpus import ReadOptions, expand_inputs
    from data_prep.shard import ShardSettings, shard_corpus
    from data_prep.tokenizer import train_tokenizer

    data_dir = Path(data_dir or shared_data_dir())
    tokenizer, shards = Path(out) / "tokenizer", Path(out) / "shards"
    if not (tokenizer / "alum_tokenizer.json").is_file():
        shutil.rmtree(tokenizer, ignore_errors=True)
        train_tokenizer(expand_inputs([str(data_dir / "wikitext-2" / "train.txt")]), ReadOptions(), tokenizer, vocab_size=2000, threads=2)
    if not (shards / "manifest.json").is_file():
        shard_corpus([str(data_dir / "wikitext-2" / "valid.txt")], tokenizer, shards, ShardSettings(seq_len=64, val_fraction=0.1))
    return tokenizer, shards


def training_args(run_dir: Path, tokenizer: Path, shards: Path, overrides=OVERRIDES, stage: int = 2, config: str = CONFIG) -> list[str]:
    """`pipeline.pretrain`'s arguments (the same for every launch of a run)."""
    return ["--config", config, "--run-dir", str(run_dir), f"data.shards={shards}", f"data.tokenizer={tokenizer}",
            f"deepspeed=configs/deepspeed/zero{stage}.json", *overrides]


# --- one launch --------------------------------------------------------------------------------


class Launch:
    """`deepspeed --num_gpus N --module pipeline.pretrain ARGS` in a new session.

    A thread reads its output (kept in `log`), noting rank 0's progress lines; the processes
    of the job are recorded whenever the harness looks at them, so that any one still alive
    after the launcher exits can be named.
    """

    def __init__(self, args: list[str], log: Path, world: int = 2):
        from pipeline.distributed import free_port

        launcher = Path(sys.executable).parent / "deepspeed"
        self.port = free_port()
        command = [str(launcher), "--num_gpus", str(world), "--master_port", str(self.port), "--module", "pipeline.pretrain", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
        self.log_path = Path(log)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, errors="replace", start_new_session=True)
        self.pgid = self.process.pid
        self.lines: list[str] = []
        self.steps: list[tuple[float, int]] = []  # (monotonic time, step) of each progress line
        self.seen: dict[int, psutil.Process] = {}
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._last_look = 0.0
        self.reaped_at: float | None = None  # wall time the launcher was reaped (its pid, the group's id, is free from then)
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


# --- the run directory -------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, without a trailing line a kill cut short."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock figures."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step*") if p.is_dir()) if root.is_dir() else []


def tag_step(tag: str) -> int:
    return int(tag[len("step"):])


def newest_complete(run_dir: Path) -> str | None:
    complete = [p.name for p in checkpoint_dirs(run_dir) if (p / "complete.json").is_file()]
    return complete[-1] if complete else None


def partial_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint directories newer than the newest complete one, without complete.json."""
    newest = newest_complete(run_dir)
    return [p.name for p in checkpoint_dirs(run_dir) if not (p / "complete.json").is_file() and (newest is None or p.name > newest)]


def run_settings(run_dir: Path) -> dict:
    """max_steps, checkpoint every, global batch: from the run's resolved config.yaml."""
    import yaml

    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return {"max_steps": config["train"]["max_steps"], "every": config["checkpoint"]["every_steps"],
            "global_batch_size": config["train"]["global_batch_size"]}


def save_seconds(run_dir: Path) -> float | None:
    """How long the complete checkpoints took to write (first file to complete.json), the median."""
    times = []
    for tag in checkpoint_dirs(run_dir):
        done = tag / "complete.json"
        try:  # rank 0 may be pruning it right now
            files = [p for p in tag.iterdir() if p.is_file() and p.name != "complete.json"] if done.is_file() else []
            if files:
                times.append(done.stat().st_mtime - min(p.stat().st_mtime for p in files))
        except FileNotFoundError:
            pass
    return statistics.median(times) if times else None


# --- faults ------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    step: int  # strike once the launch has logged this step (or its first step, if later)
    fraction: float  # of a step (kill-group, kill-rank) or of the expected save time (kill-in-save) to wait
    rank: int | None = None  # the local rank a kill-rank fault kills


def plan_faults(count: int, seed: int, max_steps: int, world: int = 2, kinds=KINDS) -> list[Fault]:
    """`count` faults at sorted random steps in [1, max_steps - 1]; the kinds take turns, shuffled."""
    rng = random.Random(seed)
    chosen = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(chosen)
    steps = sorted(rng.randint(1, max_steps - 1) for _ in range(count))
    faults = []
    for kind, step in zip(chosen, steps):
        fraction, rank = rng.random(), rng.randrange(world)
        faults.append(Fault(kind, step, round(fraction, 3), rank if kind == "kill-rank" else None))
    return faults


@dataclass
class FaultResult:
    index: int
    kind: str
    planned_step: int
    injected: bool = False
    what: str = ""  # where the kill landed, in words
    struck_after_step: int | None = None  # the launch's last progress line when the kill was sent
    rank: int | None = None
    save_tag: str | None = None  # kill-in-save: the checkpoint being written
    partial_when_killed: bool | None = None  # kill-in-save: it had no complete.json after the job died
    launcher_exit_code: int | None = None
    exit_seconds: float | None = None  # from the kill to the launcher's exit
    all_gone_seconds: float | None = None  # from the kill to the last process of the job gone
    hung: bool = False  # the launcher did not exit by itself in time
    leftovers: list[str] = field(default_factory=list)  # processes alive after the launcher exited
    last_logged_step: int = 0  # in metrics.jsonl after the job ended
    complete_at_kill: str | None = None  # the newest complete checkpoint when the kill was sent
    newest_complete: str | None = None  # on disk after the job ended: what the relaunch must resume from
    partials: list[str] = field(default_factory=list)  # partial checkpoints left by the fault
    resumed_line: str | None = None
    resumed_step: int | None = None  # from the relaunch's "resumed from" line (0: started over)
    resumed: bool = False  # from newest_complete exactly (or from scratch with none)
    partial_noted: bool | None = None  # the relaunch named every partial checkpoint ("partial checkpoint ... <tag>")
    steps_lost: int | None = None  # last_logged_step - resumed_step


@dataclass
class FaultedRun:
    faults: list[FaultResult]
    final_exit_code: int | None
    launches: int
    seconds: float
    final_leftovers: list[str] = field(default_factory=list)
    shm_files: int = 0  # DeepSpeed /dev/shm buffers the launches left behind (removed by the harness)
    shm_bytes: int = 0


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return str(p.pid)


def _checkpoint_steps(settings: dict) -> list[int]:
    steps = set(range(settings["every"], settings["max_steps"] + 1, settings["every"])) | {settings["max_steps"]}
    return sorted(steps)


def _strike(launch: Launch, fault: Fault, result: FaultResult, run_dir: Path, timeout: float) -> float | None:
    """Wait for the fault's moment and kill; the kill's monotonic time, or None if the run ended first."""
    if not launch.wait_for(lambda: launch.last_step is not None, timeout):
        return None
    step = max(fault.step, launch.steps[0][1])
    if not launch.wait_for_step(step, timeout):
        return None
    settings = run_settings(run_dir)
    launch.look(force=True)
    if fault.kind in ("kill-group", "kill-rank"):
        time.sleep(fault.fraction * launch.step_seconds(run_dir))
        result.struck_after_step = launch.last_step
        victim = None
        if fault.kind == "kill-rank":
            ranks = launch.ranks()
            victim = ranks.get(fault.rank)
            if victim is None:
                return None
            result.rank = fault.rank
        if launch.poll() is not None:
            return None
        saving = [p.name for p in checkpoint_dirs(run_dir) if not (p / "complete.json").is_file()]
        result.complete_at_kill = newest_complete(run_dir)
        killed = time.monotonic()
        if victim is not None:
            victim.kill()
        else:
            launch.kill_group()
        target = f"local rank {fault.rank}" if victim is not None else "process group"
        where = f"saving {saving[-1]}" if saving else f"step {result.struck_after_step + 1} in flight"
        if result.struck_after_step >= settings["max_steps"]:
            where = "after the last step"
        result.what = f"SIGKILL {target} {fault.fraction:.0%} of a step after step {result.struck_after_step} ({where})"
        return killed
    # kill-in-save: the first checkpoint at or after the step that is not complete yet
    expected = save_seconds(run_dir)
    delay = fault.fraction * 0.5 * expected if expected else 0.0
    deadline = time.monotonic() + timeout
    for target_step in (s for s in _checkpoint_steps(settings) if s >= step):
        tag = Path(run_dir) / "checkpoints" / f"step{target_step:08d}"
        if (tag / "complete.json").is_file():
            continue
        while not tag.is_dir():
            if launch.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(POLL)
        appeared = time.monotonic()
        while time.monotonic() < appeared + delay and not (tag / "complete.json").exists():
            time.sleep(POLL)
        if (tag / "complete.json").exists():
            continue  # the save finished first: strike at the next one
        result.complete_at_kill = newest_complete(run_dir)
        killed = time.monotonic()
        launch.kill_group()
        result.struck_after_step = launch.last_step
        result.save_tag = tag.name
        result.what = f"SIGKILL process group {killed - appeared:.3f} s into saving {tag.name}"
        return killed
    return None


def _end_of_job(launch: Launch, killed: float, result: FaultResult, exit_timeout: float, grace: float = 5) -> None:
    """Wait for the job to end after a kill; measure it; kill what is left."""
    code = launch.finish(exit_timeout)
    exited = time.monotonic()
    if code is None:
        result.hung = True
        launch.kill_group()
        code = launch.finish(10)
        exited = time.monotonic()
    result.launcher_exit_code = code
    result.exit_seconds = round(exited - killed, 2)
    # Only what still runs `grace` seconds after the launcher's exit is left behind (a dead
    # rank whose parent died stays a zombie until init reaps it: that counts as gone).
    alive = _wait_gone(launch, grace)
    result.leftovers = [_describe(p) for p in alive]
    if alive:
        launch.close()
        alive = _wait_gone(launch, 10)
    result.all_gone_seconds = round(time.monotonic() - killed, 2) if not alive else None
    launch.close()


def _wait_gone(launch: Launch, timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` for every process of the job to end; those still running."""
    deadline = time.monotonic() + timeout
    while (alive := launch.alive()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _check_resume(launch: Launch, result: FaultResult, run_dir: Path, timeout: float) -> None:
    """Did the relaunch start where it should (judged at its first progress line)?"""
    launch.wait_for(lambda: launch.last_step is not None, timeout)
    output = launch.output()
    match = RESUMED.search(output)
    first = launch.steps[0][1] if launch.steps else None
    max_steps = run_settings(run_dir)["max_steps"]

    def goes_on_after(step: int) -> bool:  # its first step is the next one (none left: it ends cleanly)
        return first == step + 1 or (first is None and step == max_steps and launch.finish(timeout) == 0)

    if match:
        result.resumed_line = match.group(0)
        result.resumed_step = int(match.group(2))
        tag_ok = result.newest_complete is not None and Path(match.group(1)).name == result.newest_complete
        result.resumed = tag_ok and result.resumed_step == tag_step(result.newest_complete) and goes_on_after(result.resumed_step)
    else:
        result.resumed_step = 0
        result.resumed = result.newest_complete is None and goes_on_after(0)
    if result.partials:
        lines = [line for line in output.splitlines() if "partial checkpoint" in line]
        result.partial_noted = all(any(tag in line for line in lines) for tag in result.partials)
    result.steps_lost = result.last_logged_step - result.resumed_step


def run_with_faults(args: list[str], run_dir: Path, faults: list[Fault], log_dir: Path, launch_timeout: float = 600,
                    exit_timeout: float = 120, grace: float = 5, world: int = 2, echo=print) -> FaultedRun:
    """Launch, inject each fault in turn (relaunching after each), then let the run finish."""
    started = time.monotonic()
    results: list[FaultResult] = []
    launches = 1
    launch = Launch(args, Path(log_dir) / "launch-01.log", world)
    every = [launch]
    final_code, leftovers = None, []
    try:
        for index, fault in enumerate(faults, 1):
            result = FaultResult(index, fault.kind, fault.step)
            killed = _strike(launch, fault, result, run_dir, launch_timeout)
            if killed is None:
                echo(f"fault {index} ({fault.kind} at step {fault.step}): not injected, the launch ended first "
                     f"(exit code {launch.poll()}, log {launch.log_path})")
                break
            result.injected = True
            results.append(result)
            _end_of_job(launch, killed, result, exit_timeout, grace)
            if result.save_tag:
                result.partial_when_killed = not (Path(run_dir) / "checkpoints" / result.save_tag / "complete.json").exists()
            records = read_metrics(run_dir)
            result.last_logged_step = records[-1]["step"] if records else 0
            result.newest_complete = newest_complete(run_dir)
            result.partials = partial_checkpoints(run_dir)
            echo(f"fault {index}: {result.what}; job exited in {result.exit_seconds} s (code {result.launcher_exit_code})"
                 + (f", LEFT BEHIND: {result.leftovers}" if result.leftovers else "")
                 + f"; last logged step {result.last_logged_step}, newest complete {result.newest_complete}"
                 + ("" if result.newest_complete == result.complete_at_kill else f" (completed after the kill; {result.complete_at_kill} before)")
                 + f", partial {result.partials or '-'}")
            launches += 1
            launch = Launch(args, Path(log_dir) / f"launch-{launches:02d}.log", world)
            every.append(launch)
            _check_resume(launch, result, run_dir, launch_timeout)
            if not launch.steps and launch.poll() != 0:
                tail = "\n    ".join(launch.output().splitlines()[-5:])
                echo(f"  relaunch {launches} failed before its first step (exit code {launch.poll()}, log {launch.log_path}):\n    {tail}")
            start = result.resumed_line or "no 'resumed from' line, " + ("started from step 1" if launch.steps and launch.steps[0][1] == 1 else "did not start")
            echo(f"  relaunch {launches}: {start} -> "
                 f"{'resumed' if result.resumed else 'DID NOT RESUME CORRECTLY'}, {result.steps_lost} step(s) recomputed"
                 + ("" if result.partial_noted is None else f", partial checkpoint {'named' if result.partial_noted else 'NOT NAMED'}"))
        launch.look(force=True)
        final_code = launch.finish(launch_timeout)
        leftovers = [_describe(p) for p in _wait_gone(launch, grace)]
    finally:
        launch.close()
    return FaultedRun(results, final_code, launches, round(time.monotonic() - started, 1), leftovers,
                      sum(one.shm_removed[0] for one in every), sum(one.shm_removed[1] for one in every))


def run_reference(args: list[str], log: Path, timeout: float = 600, world: int = 2) -> float:
    """One uninterrupted launch; its wall time in seconds."""
    launch = Launch(args, log, world)
    try:
        code = launch.finish(timeout)
    finally:
        launch.close()
    if code != 0:
        raise RuntimeError(f"reference run failed (exit {code}), see {log}:\n{launch.output()[-3000:]}")
    return round(time.monotonic() - launch.started, 1)


# --- comparison and report ---------------------------------------------------------------------


@dataclass
class Comparison:
    steps: int  # in the reference
    missing_steps: list[int]  # in the reference, not in the faulted run
    repeated_steps: list[int]  # logged more than once, or not in the reference
    mismatched_steps: list[int]  # another sample digest or consumed count
    loss_mismatch_steps: list[int]
    samples_skipped_or_repeated: int
    exact: bool  # comparable(metrics) equal


def compare(run_dir: Path, reference_dir: Path, global_batch_size: int) -> Comparison:
    ref, got = read_metrics(reference_dir), read_metrics(run_dir)
    by_step = {r["step"]: r for r in ref}
    counts = Counter(r["step"] for r in got)
    missing = sorted(set(by_step) - set(counts))
    repeated = sorted(s for s, n in counts.items() if n > 1 or s not in by_step)
    extra = sum(n - 1 if s in by_step else n for s, n in counts.items())
    mismatched, loss_mismatch = set(), set()
    for r in got:
        expected = by_step.get(r["step"])
        if expected is None:
            continue
        if r.get("data/sample_digest") != expected["data/sample_digest"] or r.get("data/consumed_samples") != expected["data/consumed_samples"]:
            mismatched.add(r["step"])
        if r.get("train/loss") != expected["train/loss"]:
            loss_mismatch.add(r["step"])
    samples = global_batch_size * (len(missing) + extra + len(mismatched))
    return Comparison(len(ref), missing, repeated, sorted(mismatched), sorted(loss_mismatch), samples, comparable(got) == comparable(ref))


def summarize(run: FaultedRun, comparison: Comparison, reference_seconds: float | None = None) -> dict:
    faults = run.faults
    exits = [f.exit_seconds for f in faults if f.exit_seconds is not None]
    return {
        "faults_injected": len(faults),
        "by_kind": dict(Counter(f.kind for f in faults)),
        "relaunches_resumed": sum(f.resumed for f in faults),
        "steps_lost_total": sum(f.steps_lost or 0 for f in faults),
        "exit_seconds_max": max(exits) if exits else None,
        "gone_seconds_max": max((f.all_gone_seconds for f in faults if f.all_gone_seconds is not None), default=None),
        "leftover_processes": sum(len(f.leftovers) for f in faults) + len(run.final_leftovers),
        "hung_launchers": sum(f.hung for f in faults),
        "partials_not_named": sum(f.partial_noted is False for f in faults),
        "samples_skipped_or_repeated": comparison.samples_skipped_or_repeated,
        "losses_equal": not comparison.loss_mismatch_steps and not comparison.missing_steps,
        "metrics_equal_reference": comparison.exact,
        "final_exit_code": run.final_exit_code,
        "launches": run.launches,
        "shm_buffers_left": run.shm_files,
        "shm_mib_left": round(run.shm_bytes / 2**20),
        "faulted_run_seconds": run.seconds,
        "reference_seconds": reference_seconds,
    }


def ok(summary: dict) -> bool:
    return (summary["samples_skipped_or_repeated"] == 0 and summary["relaunches_resumed"] == summary["faults_injected"]
            and summary["final_exit_code"] == 0 and summary["metrics_equal_reference"])


def report(run: FaultedRun, comparison: Comparison, summary: dict) -> str:
    header = ("#", "kind", "plan", "struck", "where", "exit s", "gone s", "code", "last", "ckpt", "resumed", "lost", "partial", "left")
    rows = []
    for f in run.faults:
        where = f"saving {f.save_tag}" if f.save_tag else (f"rank {f.rank}" if f.rank is not None else "group")
        partial = "-" if not f.partials else ("named" if f.partial_noted else "NOT NAMED") + f" ({','.join(f.partials)})"
        if f.save_tag and f.partial_when_killed is False:
            partial += " (save finished first)"
        rows.append((f.index, f.kind, f.planned_step, f.struck_after_step, where, f.exit_seconds, f.all_gone_seconds,
                     f.launcher_exit_code, f.last_logged_step, f.newest_complete or "none",
                     f"{f.resumed_step} {'ok' if f.resumed else 'NO'}", f.steps_lost, partial, len(f.leftovers)))
    table = [header, *[tuple("-" if v is None else str(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    s = summary
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["by_kind"].items()))
    lines += [
        "",
        f"faults injected:             {s['faults_injected']} ({kinds})",
        f"relaunches that resumed:     {s['relaunches_resumed']}/{s['faults_injected']}",
        f"steps lost to recomputation: {s['steps_lost_total']} ({', '.join(str(f.steps_lost) for f in run.faults)})",
        f"fault to job exit:           max {s['exit_seconds_max']} s ({', '.join(f'{f.kind} {f.exit_seconds}' for f in run.faults)})",
        f"fault to last process gone:  max {s['gone_seconds_max']} s",
        f"processes left behind:       {s['leftover_processes']}" + (f"; launchers that hung: {s['hung_launchers']}" if s["hung_launchers"] else ""),
        f"partial checkpoints unnamed: {s['partials_not_named']}",
        f"/dev/shm left by launches:   {s['shm_buffers_left']} DeepSpeed all-reduce buffers, {s['shm_mib_left']} MiB (removed by the harness)",
        f"samples skipped or repeated: {s['samples_skipped_or_repeated']}"
        + (f" (missing steps {comparison.missing_steps}, repeated {comparison.repeated_steps}, other batch {comparison.mismatched_steps})"
           if s["samples_skipped_or_repeated"] else ""),
        f"losses equal the reference:  {s['losses_equal']}" + (f" (differ at {comparison.loss_mismatch_steps})" if comparison.loss_mismatch_steps else ""),
        f"metrics equal the reference: {s['metrics_equal_reference']} ({comparison.steps} steps)",
        f"final launch exit code:      {s['final_exit_code']} after {s['launches']} launches, {s['faulted_run_seconds']} s"
        + (f" (uninterrupted: {s['reference_seconds']} s)" if s["reference_seconds"] is not None else ""),
        f"result:                      {'PASS' if ok(s) else 'FAIL'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=6, help="how many faults to inject (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan (default 0)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated fault kinds (default {','.join(KINDS)})")
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides (after the harness's)")
    parser.add_argument("--tokenizer", type=Path, help="an existing tokenizer directory (with --shards)")
    parser.add_argument("--shards", type=Path, help="existing shards made with that tokenizer")
    parser.add_argument("--data", type=Path, help="the test-data directory (default: $ALUM_SHARED_DATA)")
    parser.add_argument("--work-dir", type=Path, help="where data, runs and logs go (default: a temporary directory, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--exit-timeout", type=float, default=120, help="seconds a faulted job may take to exit by itself (default 120)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    if (args.tokenizer is None) != (args.shards is None):
        parser.error("--tokenizer and --shards go together")
    if args.work_dir and args.work_dir.exists() and any((args.work_dir / name).exists() for name in ("reference", "faulted")):
        parser.error(f"--work-dir {args.work_dir}: holds runs already; give a new directory")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.tokenizer:
            tokenizer, shards = args.tokenizer.resolve(), args.shards.resolve()
        else:
            t = time.monotonic()
            tokenizer, shards = prepare_data(work / "data", args.data)
            print(f"tokenizer and shards in {work / 'data'} ({time.monotonic() - t:.0f} s)", flush=True)
        overrides = (*OVERRIDES, *args.set)
        reference_dir, run_dir, logs = work / "reference" / "run", work / "faulted" / "run", work / "logs"
        print(f"reference: uninterrupted 2-rank run in {reference_dir}", flush=True)
        reference_seconds = run_reference(training_args(reference_dir, tokenizer, shards, overrides, args.stage), logs / "reference.log")
        settings = run_settings(reference_dir)
        print(f"reference: {settings['max_steps']} steps, checkpoint every {settings['every']}, {reference_seconds} s", flush=True)
        faults = plan_faults(args.faults, args.seed, settings["max_steps"], kinds=kinds)
        print("plan (seed {}): {}".format(args.seed, ", ".join(
            f"{f.kind} after step {f.step}" + (f" (rank {f.rank})" if f.rank is not None else "") for f in faults)), flush=True)
        run = run_with_faults(training_args(run_dir, tokenizer, shards, overrides, args.stage), run_dir, faults, logs,
                              exit_timeout=args.exit_timeout, echo=lambda line: print(line, flush=True))
        comparison = compare(run_dir, reference_dir, settings["global_batch_size"])
        summary = summarize(run, comparison, reference_seconds)
        print()
        print(report(run, comparison, summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"seed": args.seed, "plan": [asdict(f) for f in faults], "summary": summary,
                                             "faults": [asdict(f) for f in run.faults], "comparison": asdict(comparison),
                                             "work_dir": str(work)}, indent=2) + "\n")
        if args.work_dir or args.keep:
            print(f"runs and launch logs: {work}")
        return 0 if ok(summary) else 1
    finally:
        if not (args.work_dir or args.keep):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
