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

The run: the tests' tiny run (bench/tiny_run.py), ZeRO-2, W&B off, 16 steps of 16 samples,
ALUM from step 8, a checkpoint every 3 steps (so that kills land between checkpoints as well
as in saves); `--set key=value` changes any of it.

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
unlinks it; `pipeline.train.pretrain` unlinks its own once every rank has mapped them, so a launch
leaves none, killed or not. The harness checks that: it counts (and removes) any its
launches left behind; the report must say 0.

The tokenizer (vocab 2000, WikiText-2 train) and shards (WikiText-2 valid, 64-token rows,
10% val) are built once into the work directory by the functions the tests' fixtures use
(bench/tiny_run.py); `ALUM_SHARED_DATA` (or `--data`) names the data directory.

    python bench/fault_injection.py                                # 6 faults, seed 0: 16 steps, checkpoint every 3
    python bench/fault_injection.py --faults 9 --seed 3 --json faults.json
    python bench/fault_injection.py --tokenizer tok/ --shards shards/ --work-dir runs/faults --keep
    python bench/fault_injection.py --kinds kill-rank --faults 4   # one kind only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_dir import data_dir  # noqa: E402  (these import the project, so after the line above)
from fault_launch import Launch, describe  # noqa: E402
from fault_report import compare, passed, report, summarize  # noqa: E402
from faults import KINDS, Fault, FaultedRun, FaultResult, check_resume, inject, plan_faults  # noqa: E402
from run_files import run_settings  # noqa: E402
from tiny_run import RUN, build_shards, build_tokenizer, pretrain_args  # noqa: E402

# The tests' run, twice as long, with checkpoints every 3 steps so that kills land between
# checkpoints as well as in saves; W&B off.
OVERRIDES = (*RUN, "wandb.mode=disabled", "train.max_steps=16", "adversarial.start_step=8", "checkpoint.every_steps=3")


def prepare_data(out: Path, data: Path) -> tuple[Path, Path]:
    """(tokenizer, shards) of the tiny run, built in `out` from the test data in `data` once; reused if there."""
    tokenizer, shards = Path(out) / "tokenizer", Path(out) / "shards"
    if not (tokenizer / "alum_tokenizer.json").is_file():
        shutil.rmtree(tokenizer, ignore_errors=True)
        build_tokenizer(Path(data) / "wikitext-2" / "train.txt", tokenizer)
    if not (shards / "manifest.json").is_file():
        build_shards(Path(data) / "wikitext-2" / "valid.txt", tokenizer, shards)
    return tokenizer, shards


def run_with_faults(
    args: list[str],
    run_dir: Path,
    faults: list[Fault],
    log_dir: Path,
    launch_timeout: float = 600,
    exit_timeout: float = 120,
    grace: float = 5,
    world: int = 2,
    echo=print,
) -> FaultedRun:
    """Launch, inject each fault in turn (relaunching after each), then let the run finish."""
    started = time.monotonic()
    results: list[FaultResult] = []
    every = [Launch(args, Path(log_dir) / "launch-01.log", world)]
    final_code, leftovers = None, []
    try:
        for index, fault in enumerate(faults, 1):
            launch = every[-1]
            result = inject(launch, fault, index, run_dir, launch_timeout, exit_timeout, grace)
            if result is None:
                echo(
                    f"fault {index} ({fault.kind} at step {fault.step}): not injected, the launch ended first "
                    f"(exit code {launch.poll()}, log {launch.log_path})"
                )
                break
            results.append(result)
            echo(_fault_line(result))
            every.append(Launch(args, Path(log_dir) / f"launch-{len(every) + 1:02d}.log", world))
            check_resume(every[-1], result, run_dir, launch_timeout)
            for line in _relaunch_lines(every[-1], len(every), result):
                echo(line)
        every[-1].look(force=True)
        final_code = every[-1].finish(launch_timeout)
        leftovers = [describe(p) for p in every[-1].wait_gone(grace)]
    finally:
        every[-1].close()
    return FaultedRun(
        results,
        final_code,
        len(every),
        round(time.monotonic() - started, 1),
        leftovers,
        sum(one.shm_removed[0] for one in every),
        sum(one.shm_removed[1] for one in every),
    )


def _fault_line(result: FaultResult) -> str:
    """Where a fault struck and what the job left: the line printed once the job has ended."""
    return (
        f"fault {result.index}: {result.what}; job exited in {result.exit_seconds} s (code {result.launcher_exit_code})"
        + (f", LEFT BEHIND: {result.leftovers}" if result.leftovers else "")
        + f"; last logged step {result.last_logged_step}, newest complete {result.newest_complete}"
        + (
            ""
            if result.newest_complete == result.complete_at_kill
            else f" (completed after the kill; {result.complete_at_kill} before)"
        )
        + f", partial {result.partials or '-'}"
    )


def _relaunch_lines(launch: Launch, number: int, result: FaultResult) -> list[str]:
    """Where relaunch `number` started, judged against the fault before it."""
    lines = []
    if not launch.steps and launch.poll() != 0:
        tail = "\n    ".join(launch.output().splitlines()[-5:])
        lines.append(
            f"  relaunch {number} failed before its first step (exit code {launch.poll()}, log {launch.log_path}):\n  "
            f"  {tail}"
        )
    start = result.resumed_line or "no 'resumed from' line, " + (
        "started from step 1" if launch.steps and launch.steps[0][1] == 1 else "did not start"
    )
    lines.append(
        f"  relaunch {number}: {start} -> "
        f"{'resumed' if result.resumed else 'DID NOT RESUME CORRECTLY'}, {result.steps_lost} step(s) recomputed"
        + (
            ""
            if result.partial_noted is None
            else f", partial checkpoint {'named' if result.partial_noted else 'NOT NAMED'}"
        )
    )
    return lines


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


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _rehearse(args, work)
    finally:
        if not (args.work_dir or args.keep):
            shutil.rmtree(work, ignore_errors=True)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faults", type=int, default=6, help="how many faults to inject (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan (default 0)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated fault kinds (default {','.join(KINDS)})"
    )
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage (default 2)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides (after the harness's)"
    )
    parser.add_argument("--tokenizer", type=Path, help="an existing tokenizer directory (with --shards)")
    parser.add_argument("--shards", type=Path, help="existing shards made with that tokenizer")
    parser.add_argument("--data", type=Path, help="the test-data directory (default: $ALUM_SHARED_DATA)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where data, runs and logs go (default: a temporary directory, removed unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument(
        "--exit-timeout", type=float, default=120, help="seconds a faulted job may take to exit by itself (default 120)"
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    args.kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not args.kinds or any(k not in KINDS for k in args.kinds):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    if (args.tokenizer is None) != (args.shards is None):
        parser.error("--tokenizer and --shards go together")
    if (
        args.work_dir
        and args.work_dir.exists()
        and any((args.work_dir / name).exists() for name in ("reference", "faulted"))
    ):
        parser.error(f"--work-dir {args.work_dir}: holds runs already; give a new directory")
    return args


def _rehearse(args: argparse.Namespace, work: Path) -> int:
    """The reference run, the faulted run and the report; the exit code (1: FAIL)."""
    if args.tokenizer:
        tokenizer, shards = args.tokenizer.resolve(), args.shards.resolve()
    else:
        t = time.monotonic()
        tokenizer, shards = prepare_data(work / "data", args.data or data_dir())
        print(f"tokenizer and shards in {work / 'data'} ({time.monotonic() - t:.0f} s)", flush=True)
    overrides = (*OVERRIDES, *args.set)
    reference_dir, run_dir, logs = work / "reference" / "run", work / "faulted" / "run", work / "logs"
    print(f"reference: uninterrupted 2-rank run in {reference_dir}", flush=True)
    reference_seconds = run_reference(
        pretrain_args(reference_dir, shards, tokenizer, *overrides, stage=args.stage), logs / "reference.log"
    )
    settings = run_settings(reference_dir)
    print(
        f"reference: {settings['max_steps']} steps, checkpoint every {settings['every']}, {reference_seconds} s",
        flush=True,
    )
    faults = plan_faults(args.faults, args.seed, settings["max_steps"], kinds=args.kinds)
    print(
        "plan (seed {}): {}".format(
            args.seed,
            ", ".join(
                f"{f.kind} after step {f.step}" + (f" (rank {f.rank})" if f.rank is not None else "") for f in faults
            ),
        ),
        flush=True,
    )
    run = run_with_faults(
        pretrain_args(run_dir, shards, tokenizer, *overrides, stage=args.stage),
        run_dir,
        faults,
        logs,
        exit_timeout=args.exit_timeout,
        echo=lambda line: print(line, flush=True),
    )
    comparison = compare(run_dir, reference_dir, settings["global_batch_size"])
    summary = summarize(run, comparison, reference_seconds)
    print()
    print(report(run, comparison, summary), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "plan": [asdict(f) for f in faults],
                    "summary": summary,
                    "faults": [asdict(f) for f in run.faults],
                    "comparison": asdict(comparison),
                    "work_dir": str(work),
                },
                indent=2,
            )
            + "\n"
        )
    if args.work_dir or args.keep:
        print(f"runs and launch logs: {work}")
    return 0 if passed(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
