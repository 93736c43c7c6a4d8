"""The faults: a seeded plan of kills, striking one at its moment, the job's end after it,
and whether the relaunch resumed where it had to."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from fault_launch import Launch, describe
from run_files import (
    checkpoint_dirs,
    checkpoint_steps,
    newest_complete,
    partial_checkpoints,
    read_metrics,
    run_settings,
    save_seconds,
    tag_step,
)

KINDS = ("kill-group", "kill-rank", "kill-in-save")
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)\)")
POLL = 0.002  # seconds between looks for a checkpoint being saved


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


def inject(
    launch: Launch,
    fault: Fault,
    index: int,
    run_dir: Path,
    launch_timeout: float,
    exit_timeout: float,
    grace: float = 5,
) -> FaultResult | None:
    """Strike `fault` at `launch`, wait for the job to end and note what it left on disk; None
    if the launch ended before the fault's moment."""
    result = FaultResult(index, fault.kind, fault.step)
    killed = _strike(launch, fault, result, run_dir, launch_timeout)
    if killed is None:
        return None
    result.injected = True
    _end_of_job(launch, killed, result, exit_timeout, grace)
    if result.save_tag:
        result.partial_when_killed = not (Path(run_dir) / "checkpoints" / result.save_tag / "complete.json").exists()
    records = read_metrics(run_dir)
    result.last_logged_step = records[-1]["step"] if records else 0
    result.newest_complete = newest_complete(run_dir)
    result.partials = partial_checkpoints(run_dir)
    return result


def _strike(launch: Launch, fault: Fault, result: FaultResult, run_dir: Path, timeout: float) -> float | None:
    """Wait for the fault's moment and kill; the kill's monotonic time, or None if the run ended first."""
    if not launch.wait_for(lambda: launch.last_step is not None, timeout):
        return None
    step = max(fault.step, launch.steps[0][1])
    if not launch.wait_for_step(step, timeout):
        return None
    settings = run_settings(run_dir)
    launch.look(force=True)
    if fault.kind == "kill-in-save":
        return _kill_in_save(launch, fault, result, run_dir, step, settings, timeout)
    return _kill_mid_step(launch, fault, result, run_dir, settings["max_steps"])


def _kill_mid_step(launch: Launch, fault: Fault, result: FaultResult, run_dir: Path, max_steps: int) -> float | None:
    """kill-group and kill-rank: `fraction` of a step after the last progress line."""
    time.sleep(fault.fraction * launch.step_seconds(run_dir))
    result.struck_after_step = launch.last_step
    victim = None
    if fault.kind == "kill-rank":
        victim = launch.ranks().get(fault.rank)
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
    if result.struck_after_step >= max_steps:
        where = "after the last step"
    result.what = f"SIGKILL {target} {fault.fraction:.0%} of a step after step {result.struck_after_step} ({where})"
    return killed


def _kill_in_save(
    launch: Launch, fault: Fault, result: FaultResult, run_dir: Path, step: int, settings: dict, timeout: float
) -> float | None:
    """kill-in-save: the first checkpoint at or after `step` that is not complete yet, `fraction`
    of the first half of what earlier saves took after its directory appeared."""
    expected = save_seconds(run_dir)
    delay = fault.fraction * 0.5 * expected if expected else 0.0
    deadline = time.monotonic() + timeout
    for target_step in (s for s in checkpoint_steps(settings) if s >= step):
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
    alive = launch.wait_gone(grace)
    result.leftovers = [describe(p) for p in alive]
    if alive:
        launch.close()
        alive = launch.wait_gone(10)
    result.all_gone_seconds = round(time.monotonic() - killed, 2) if not alive else None
    launch.close()


def check_resume(launch: Launch, result: FaultResult, run_dir: Path, timeout: float) -> None:
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
        result.resumed = (
            tag_ok and result.resumed_step == tag_step(result.newest_complete) and goes_on_after(result.resumed_step)
        )
    else:
        result.resumed_step = 0
        result.resumed = result.newest_complete is None and goes_on_after(0)
    if result.partials:
        lines = [line for line in output.splitlines() if "partial checkpoint" in line]
        result.partial_noted = all(any(tag in line for line in lines) for tag in result.partials)
    result.steps_lost = result.last_logged_step - result.resumed_step
