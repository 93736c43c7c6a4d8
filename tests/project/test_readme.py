"""The README's set-up commands are the ones CI runs and the CLI offers."""

from __future__ import annotations

import re

from helpers import REPO


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks if b.strip().startswith("python3 -m venv")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    demo, tests = readme_commands()
    assert demo.endswith("alum demo") and tests.endswith("python -m pytest")
    assert "torch==2.13.0" in demo and "torch==2.13.0" in tests
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines
