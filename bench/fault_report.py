"""The faulted run against the uninterrupted one, step by step, and the report: a table of the
faults, the figures over all of them, and PASS or FAIL."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from faults import FaultedRun
from run_files import read_metrics
from tiny_run import comparable


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
    """The faulted run's metrics against the reference's, step by step; a step missing, repeated
    or with another batch counts `global_batch_size` samples."""
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
        if (
            r.get("data/sample_digest") != expected["data/sample_digest"]
            or r.get("data/consumed_samples") != expected["data/consumed_samples"]
        ):
            mismatched.add(r["step"])
        if r.get("train/loss") != expected["train/loss"]:
            loss_mismatch.add(r["step"])
    samples = global_batch_size * (len(missing) + extra + len(mismatched))
    return Comparison(
        len(ref),
        missing,
        repeated,
        sorted(mismatched),
        sorted(loss_mismatch),
        samples,
        comparable(got) == comparable(ref),
    )


def summarize(run: FaultedRun, comparison: Comparison, reference_seconds: float | None = None) -> dict:
    """The figures over all faults (the JSON report's "summary")."""
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


def passed(summary: dict) -> bool:
    """Nothing skipped or repeated, every relaunch resumed, the run finished with the reference's metrics."""
    return (
        summary["samples_skipped_or_repeated"] == 0
        and summary["relaunches_resumed"] == summary["faults_injected"]
        and summary["final_exit_code"] == 0
        and summary["metrics_equal_reference"]
    )


def report(run: FaultedRun, comparison: Comparison, summary: dict) -> str:
    return "\n".join([*_table(run), "", *_figures(run, comparison, summary)])


def _table(run: FaultedRun) -> list[str]:
    """One line a fault: where it struck, how the job ended, where the relaunch resumed."""
    header = (
        "#",
        "kind",
        "plan",
        "struck",
        "where",
        "exit s",
        "gone s",
        "code",
        "last",
        "ckpt",
        "resumed",
        "lost",
        "partial",
        "left",
    )
    rows = []
    for f in run.faults:
        where = f"saving {f.save_tag}" if f.save_tag else (f"rank {f.rank}" if f.rank is not None else "group")
        partial = (
            "-" if not f.partials else ("named" if f.partial_noted else "NOT NAMED") + f" ({','.join(f.partials)})"
        )
        if f.save_tag and f.partial_when_killed is False:
            partial += " (save finished first)"
        rows.append(
            (
                f.index,
                f.kind,
                f.planned_step,
                f.struck_after_step,
                where,
                f.exit_seconds,
                f.all_gone_seconds,
                f.launcher_exit_code,
                f.last_logged_step,
                f.newest_complete or "none",
                f"{f.resumed_step} {'ok' if f.resumed else 'NO'}",
                f.steps_lost,
                partial,
                len(f.leftovers),
            )
        )
    table = [header, *[tuple("-" if v is None else str(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]


def _figures(run: FaultedRun, comparison: Comparison, s: dict) -> list[str]:
    """The summary over all faults, one figure a line."""
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["by_kind"].items()))
    return [
        f"faults injected:             {s['faults_injected']} ({kinds})",
        f"relaunches that resumed:     {s['relaunches_resumed']}/{s['faults_injected']}",
        f"steps lost to recomputation: {s['steps_lost_total']} ({', '.join(str(f.steps_lost) for f in run.faults)})",
        f"fault to job exit:           max {s['exit_seconds_max']} s "
        f"({', '.join(f'{f.kind} {f.exit_seconds}' for f in run.faults)})",
        f"fault to last process gone:  max {s['gone_seconds_max']} s",
        f"processes left behind:       {s['leftover_processes']}"
        + (f"; launchers that hung: {s['hung_launchers']}" if s["hung_launchers"] else ""),
        f"partial checkpoints unnamed: {s['partials_not_named']}",
        f"/dev/shm left by launches:   {s['shm_buffers_left']} DeepSpeed all-reduce buffers, {s['shm_mib_left']} MiB "
        "(removed by the harness)",
        f"samples skipped or repeated: {s['samples_skipped_or_repeated']}"
        + (
            f" (missing steps {comparison.missing_steps}, repeated {comparison.repeated_steps}, other batch "
            f"{comparison.mismatched_steps})"
            if s["samples_skipped_or_repeated"]
            else ""
        ),
        f"losses equal the reference:  {s['losses_equal']}"
        + (f" (differ at {comparison.loss_mismatch_steps})" if comparison.loss_mismatch_steps else ""),
        f"metrics equal the reference: {s['metrics_equal_reference']} ({comparison.steps} steps)",
        f"final launch exit code:      {s['final_exit_code']} after {s['launches']} launches, "
        f"{s['faulted_run_seconds']} s"
        + (f" (uninterrupted: {s['reference_seconds']} s)" if s["reference_seconds"] is not None else ""),
        f"result:                      {'PASS' if passed(s) else 'FAIL'}",
    ]
