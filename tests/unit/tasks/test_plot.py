"""`alum plot`: the PNG is real and the drawn series are exactly the logged ones."""

from __future__ import annotations

import json
import math
import re

import matplotlib.image
import pytest

from data_prep.errors import UserError
from pipeline.tasks.plot import main, plot_runs, read_series
from pipeline.train.metrics import METRICS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = list(range(1, 21))
EVAL_STEPS = [5, 10, 15, 20]
NAN_STEP = 7  # train/loss is logged as "nan" here, as metrics._plain writes it


def make_run(run_dir, scale: float, torn: bool) -> list[dict]:
    """A 20-step log: ALUM starts at step 11 (loss_adv 0 before), eval every 5 steps."""
    run_dir.mkdir(parents=True)
    records = []
    for step in STEPS:
        mlm = scale * (8.0 - 0.2 * step)
        adv = 0.0 if step <= 10 else scale * 0.01 * step
        record = {
            "step": step,
            "train/loss": "nan" if step == NAN_STEP else mlm + adv,
            "train/loss_mlm": mlm,
            "train/loss_adv": adv,
            "train/mask_rate": 0.10 + 0.005 * step,
            "train/lr": 1e-4 * min(1.0, step / 5),
            "data/sample_digest": f"{step:016d}",  # a string, not a series
        }
        if step in EVAL_STEPS:
            record.update({"eval/ppl": scale * 900.0 / step, "eval/loss": math.log(scale * 900.0 / step)})
        records.append(record)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / METRICS).write_text(text + ('{"step": 21, "train/lo' if torn else ""))  # killed mid-write
    return records


def logged(records: list[dict], key: str, keep=lambda v: True) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and not isinstance(r[key], str) and keep(r[key])]
    return [s for s, _ in pairs], [float(v) for _, v in pairs]


@pytest.fixture
def two_runs(tmp_path):
    """Two runs both named `run` (under `a/` and `b/`), so default labels need the parent."""
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    return {"a/run": (a, make_run(a, 1.0, torn=True)), "b/run": (b, make_run(b, 1.3, torn=False))}


def test_read_series_converts_nonfinite_strings_and_skips_the_torn_line(two_runs):
    run_dir, records = two_runs["a/run"]
    series = read_series(run_dir)
    steps, values = series["train/loss"]
    assert steps == STEPS  # no step 21 from the torn line
    assert math.isnan(values[STEPS.index(NAN_STEP)])
    assert series["eval/ppl"] == logged(records, "eval/ppl")
    assert series["eval/ppl"][0] == EVAL_STEPS
    assert "data/sample_digest" not in series and "step" not in series


def test_plot_draws_every_panel_from_the_logs(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    drawn = plot_runs([run_dir for run_dir, _ in two_runs.values()], out)

    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 600 and image.shape[1] > 1000
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["curves.png"]  # no temporary left

    assert set(drawn) == set(two_runs)
    for label, (_, records) in two_runs.items():
        loss_steps, _ = drawn[label]["loss"]["train/loss"]
        assert NAN_STEP not in loss_steps and 21 not in loss_steps
        assert drawn[label] == {
            "loss": {
                "train/loss": logged(records, "train/loss"),
                "train/loss_mlm": logged(records, "train/loss_mlm"),
            },
            "adversarial": {"train/loss_adv": logged(records, "train/loss_adv", keep=lambda v: v > 0)},
            "eval": {"eval/ppl": logged(records, "eval/ppl")},
            "mask_rate": {"train/mask_rate": logged(records, "train/mask_rate")},
            "lr": {"train/lr": logged(records, "train/lr")},
        }
        assert drawn[label]["adversarial"]["train/loss_adv"][0] == list(range(11, 21))
        assert drawn[label]["eval"]["eval/ppl"][0] == EVAL_STEPS


def test_main_writes_the_plot_with_given_labels(two_runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    (a, _), (b, _) = two_runs.values()
    assert main(["--run-dir", str(a), "--run-dir", str(b), "--out", str(out), "--labels", "alum,baseline"]) == 0
    assert capsys.readouterr().out == f"plot written: {out} (2 runs)\n"
    assert out.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing run dir", "nowhere: run directory does not exist"),
        ("not png", "curves.jpg: the output must be a .png file"),
        ("missing out dir", "no-such-dir: output directory does not exist"),
        ("labels mismatch", "--labels: 3 labels for 2 run directories"),
        ("empty log", "metrics.jsonl: no records"),
    ],
)
def test_main_refuses_bad_input_with_one_line(two_runs, tmp_path, capsys, case, expected):
    (a, _), (b, _) = two_runs.values()
    out = tmp_path / "curves.png"
    extra = []
    if case == "missing run dir":
        b = tmp_path / "nowhere"
    elif case == "not png":
        out = tmp_path / "curves.jpg"
    elif case == "missing out dir":
        out = tmp_path / "no-such-dir" / "curves.png"
    elif case == "labels mismatch":
        extra = ["--labels", "x,y,z"]
    elif case == "empty log":
        (b / METRICS).write_text('{"step": 1, "train/lo')  # only a torn line
    assert main(["--run-dir", str(a), "--run-dir", str(b), "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("plot: error: ") and captured.err.count("\n") == 1
    assert expected in captured.err
    assert not out.exists()


def test_a_directory_without_a_log_is_named(tmp_path):
    with pytest.raises(UserError, match="^" + re.escape(f"{tmp_path / METRICS}: no metrics log here")):
        read_series(tmp_path)


def test_a_mixture_runs_named_sets_are_drawn_in_the_eval_panel(tmp_path):
    run_dir = tmp_path / "mixture"
    run_dir.mkdir()
    records = [
        {"step": s, "train/loss": 5.0, "eval/wiki/ppl": 100.0 / s, "eval/sst2/ppl": 300.0 / s, "eval/wiki/loss": 1.0}
        for s in (4, 8)
    ]
    (run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = plot_runs([run_dir], tmp_path / "mixture.png")
    assert drawn["mixture"]["eval"] == {
        "eval/sst2/ppl": ([4, 8], [75.0, 37.5]),
        "eval/wiki/ppl": ([4, 8], [25.0, 12.5]),
    }
