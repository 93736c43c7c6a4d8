"""The committed study's text says what its numbers say: docs/results/claims.md and the summary
blocks of the README and docs/benchmarks.md are remade from docs/results/claims.json by
bench/claims_report.py (statistics included) and compared with what is committed."""

from __future__ import annotations

import json
import subprocess

import pytest
from claims_report import SUMMARY_BLOCK, summary, table
from helpers import REPO

RESULTS = REPO / "docs" / "results"


def study() -> dict:
    return json.loads((RESULTS / "claims.json").read_text())


def test_the_table_is_the_one_the_json_gives():
    assert (RESULTS / "claims.md").read_text() == table(study())


def test_the_readme_and_the_benchmarks_page_state_the_json_figures():
    for path, brief in ((REPO / "README.md", True), (REPO / "docs" / "benchmarks.md", False)):
        found = SUMMARY_BLOCK.search(path.read_text())
        assert found, f"{path.name} has no claims summary block"
        assert found.group(0) == summary(study(), brief), f"{path.name}: the summary differs from claims.json's"


def test_the_plan_came_before_the_results():
    """study-plan.md was first committed before the first commit of claims.json with this
    study's results (its setup names the plan)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no history to read")

    def oldest(*args: str) -> int:
        out = subprocess.run(["git", "log", "--format=%ct", *args], cwd=REPO, capture_output=True, text=True)
        times = out.stdout.split()
        assert times, f"git log {' '.join(args)}: nothing found"
        return int(times[-1])

    plan = oldest("--diff-filter=A", "--", "docs/results/study-plan.md")
    results = oldest("-S", '"plan": "docs/results/study-plan.md"', "--", "docs/results/claims.json")
    assert study()["setup"]["plan"] == "docs/results/study-plan.md"
    assert plan < results
