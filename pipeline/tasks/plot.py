"""`alum plot`: training curves of one or more runs, read from their `metrics.jsonl`, as one PNG.

A run is judged at a glance from four things against step: the loss split into its standard
(MLM) and adversarial parts, the mask rate, the learning rate and the eval perplexity. Several
runs are overlaid with one colour each, so an ALUM run can be read against its baseline.
Points that cannot be drawn (NaN/inf, and zero on the log-scaled adversarial panel, which is
what the log holds before ALUM starts) are left out as gaps; `plot_runs` returns exactly what it
drew. Perplexity is log-scaled too: it falls by orders of magnitude early in training. A run on a
mixture (`data.sources`) or with `eval.sets` logs a perplexity per named set
(`eval/<name>/ppl`): each is drawn in the eval panel in a line style of its own.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from data_prep import atomic
from data_prep.errors import UserError
from pipeline.core.help_format import DefaultsHelpFormatter
from pipeline.train.metrics import METRICS, _parse

# What `metrics._plain` writes for non-finite floats (JSON has no NaN/inf).
NONFINITE = {"nan", "inf", "-inf"}

# (panel, title, y-axis label, {metric key: legend text}, log y-axis, markers). The order is the
# grid order; the last grid cell holds the run legend.
PANELS = (
    ("loss", "training loss", "loss", {"train/loss": "total", "train/loss_mlm": "standard (MLM)"}, False, False),
    (
        "adversarial",
        "adversarial loss (symmetric KL; zero before ALUM starts: not drawn)",
        "loss (log scale)",
        {"train/loss_adv": "adversarial"},
        True,
        False,
    ),
    ("eval", "eval perplexity", "perplexity (log scale)", {"eval/ppl": "eval"}, True, True),
    ("mask_rate", "mask rate", "fraction of tokens masked", {"train/mask_rate": "mask rate"}, False, False),
    ("lr", "learning rate", "learning rate", {"train/lr": "lr"}, False, False),
)
LINESTYLES = ("-", "--", ":", "-.")  # cycled: a panel may hold more series (one per named eval set)
PER_SET = {"eval": "ppl"}  # panel -> the metric each named set logs as eval/<name>/<metric>


def read_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric metric of a run as (steps, values); a torn last line (killed mid-write) is skipped.

    Values are floats, "nan"/"inf" strings included; keys holding other strings (the batch
    digest) are not series and are left out.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{path}: no metrics log here (is this a run directory?)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        record = _parse(line)
        if record is None:
            continue
        for key, value in record.items():
            if key == "step" or isinstance(value, str) and value not in NONFINITE:
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(record["step"]))
            values.append(float(value))
    if not series:
        raise UserError(f"{path}: no records")
    return series


def _labels(run_dirs: list[Path], labels: list[str] | None) -> list[str]:
    """The given labels, or each directory's name, with its parent's name where two names clash."""
    if labels is None:
        names = [p.name for p in run_dirs]
        labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]
    elif len(labels) != len(run_dirs):
        raise UserError(f"--labels: {len(labels)} labels for {len(run_dirs)} run directories")
    if len(set(labels)) != len(labels):
        raise UserError(f"run labels must be distinct (name the runs with --labels), got {', '.join(labels)}")
    return labels


def _with_named_sets(panel: str, keys: dict[str, str], runs: dict) -> dict[str, str]:
    """A panel's keys, plus eval/<name>/<metric> for every named set any run logged (PER_SET)."""
    if panel not in PER_SET:
        return keys
    suffix = "/" + PER_SET[panel]
    named = sorted(
        {
            k
            for series in runs.values()
            for k in series
            if k.startswith("eval/") and k.count("/") == 2 and k.endswith(suffix)
        }
    )
    return keys | {key: key.split("/")[1] for key in named}


def _drawable(values: list[float], log: bool) -> list[bool]:
    """Which points an axis can show: finite ones, and only positive ones on a log axis."""
    return [math.isfinite(v) and (v > 0 or not log) for v in values]


def _width(run: int, runs: int) -> float:
    """Earlier runs are drawn wider, so a later run that follows the same curve (the mask-rate
    and lr schedules often do) leaves the earlier one visible as a border instead of hiding it."""
    return 1.5 + (runs - 1 - run) * 1.2 / max(1, runs - 1)


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> dict:
    """Draw the runs' curves into `out` (PNG, written atomically) and return what was drawn.

    The result is {run label: {panel: {metric key: (steps, values)}}}, holding only series
    with at least one drawn point, so callers and tests can check the picture against the log.
    """
    run_dirs, out = [Path(p) for p in run_dirs], Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the output must be a .png file")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output directory does not exist")
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: run directory does not exist")
    labels = _labels(run_dirs, labels)
    runs = {label: read_series(run_dir) for label, run_dir in zip(labels, run_dirs)}

    fig = Figure(figsize=(16, 8.5), dpi=120)
    FigureCanvasAgg(fig)
    # One step range for every panel, so e.g. where ALUM starts lines up with the loss curves.
    *panel_axes, legend_ax = fig.subplots(2, 3, sharex=True).flat
    drawn: dict = {label: {} for label in labels}
    for ax, (panel, title, ylabel, keys, log, markers) in zip(panel_axes, PANELS):
        keys = _with_named_sets(panel, keys, runs)
        styles = [LINESTYLES[i % len(LINESTYLES)] for i in range(len(keys))]
        for colour, (label, series) in enumerate(runs.items()):
            for style, key in zip(styles, keys):
                if key not in series:
                    continue
                steps, values = series[key]
                shown = _drawable(values, log)
                if not any(shown):
                    continue
                # NaN breaks the line, so a step that cannot be drawn shows as a gap, not a bridge.
                ax.plot(
                    steps,
                    [v if ok else math.nan for v, ok in zip(values, shown)],
                    color=f"C{colour}",
                    linestyle=style,
                    linewidth=_width(colour, len(runs)),
                    marker="o" if markers else None,
                    markersize=5,
                )
                drawn[label].setdefault(panel, {})[key] = (
                    [s for s, ok in zip(steps, shown) if ok],
                    [v for v, ok in zip(values, shown) if ok],
                )
        if log:
            ax.set_yscale("log")
        elif panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if not any(panel in by_panel for by_panel in drawn.values()):
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        if len(keys) > 1:
            ax.legend(
                [Line2D([], [], color="black", linestyle=s) for s in styles],
                keys.values(),
                loc="upper right",
                fontsize=9,
            )
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelbottom=True)  # sharex would hide the top row's step labels
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    legend_ax.axis("off")
    legend_ax.legend(
        [Line2D([], [], color=f"C{i}", linewidth=3) for i in range(len(labels))],
        labels,
        title="runs",
        loc="center",
        fontsize=11,
        title_fontsize=12,
        frameon=False,
    )
    fig.tight_layout()

    tmp = atomic.temporary_name(out)
    try:
        fig.savefig(tmp, format="png")
        atomic.publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return drawn


def main(argv: list[str] | None = None) -> int:
    """`alum plot`: exit 0 with the picture written, or 2 with a one-line error on stderr."""
    parser = argparse.ArgumentParser(
        prog="alum plot",
        description="Plot training curves of runs from their metrics.jsonl.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run-dir", action="append", required=True, type=Path, help="a run directory; repeat to overlay runs"
    )
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--labels", help="comma-separated legend names, one per --run-dir (default: directory names)")
    args = parser.parse_args(argv)
    try:
        labels = [s.strip() for s in args.labels.split(",")] if args.labels is not None else None
        plot_runs(args.run_dir, args.out, labels)
    except UserError as e:
        print(f"plot: error: {e}", file=sys.stderr)
        return 2
    print(f"plot written: {args.out} ({len(args.run_dir)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
