"""The registry is the one place a method's name is dispatched on, and every method in it
answers what the trainer asks (`pipeline.methods.method.Method`)."""

from __future__ import annotations

import re

import pytest
from helpers import REPO

from pipeline.methods.adversarial import AdversarialConfig, passes
from pipeline.methods.method import Method
from pipeline.methods.registry import FINETUNE_NAMES, METHODS, method_of

REGISTRY = REPO / "pipeline" / "methods" / "registry.py"
NAMES = "|".join(re.escape(name) for name in (*METHODS, *FINETUNE_NAMES))
# `x.method == ...`, `x.method in ...`, `x.method != ...` (any right-hand side), and a method
# name compared as a string with something called method: `method == "asa"`, `"asa" != method`.
DISPATCH = [
    re.compile(r"\.method\s*(==|!=|\bin\b|\bnot\s+in\b)"),
    re.compile(rf"\bmethod\s*(==|!=)\s*[\"']({NAMES})[\"']"),
    re.compile(rf"[\"']({NAMES})[\"']\s*(==|!=)\s*\w*\.?method\b"),
]


def dispatches(text: str) -> list[tuple[int, str]]:
    """(line, text) of each line of ``text`` that compares a method name."""
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if any(pattern.search(line) for pattern in DISPATCH)
    ]


def test_no_method_name_is_dispatched_on_outside_the_registry():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line}"
        for folder in ("pipeline", "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path != REGISTRY
        for number, line in dispatches(path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize(
    "line",
    [
        'if config.method == "asa":',
        "if adversarial.method in NOT_HERE:",
        'if config.method != "none" and step >= 0:',
        "return 2 if method == 'alum_amortized' else 1",
        'if "freeat" != config.method:',
        'if "pgd" == method:',
        "if args.method == 'standard':",
    ],
)
def test_the_check_sees_a_dispatch(line):
    assert dispatches(line) == [(1, line)]


@pytest.mark.parametrize(
    "line",
    [
        'AdversarialConfig(method="alum")',
        'f"adversarial.method={config.method} needs"',
        "method_of(config)",
        'Path(a).name == "alum"',  # the command, not the method
    ],
)
def test_the_check_lets_a_name_pass_that_is_not_compared(line):
    assert dispatches(line) == []


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_answers_the_trainer(name):
    cls = METHODS[name]
    assert issubclass(cls, Method) and cls.name == name
    config = AdversarialConfig(method=name, start_step=2)
    method = method_of(config)
    assert config.steps == cls.default_steps and config.norm == cls.default_norm
    assert not method.active(1) and method.passes(1) == 1 and method.replay_index(1) == 0
    assert method.active(2) == cls.adversarial and passes(config, 2) == method.passes(2) >= 1
    assert all(method.at_boundary(2 + cls.default_steps * k) for k in range(3))
    assert cls.keeps_state or method.stat_names(None) == []  # only a companion adds numbers
    if cls.driven:  # a backward between its losses: one backward cannot run it
        with pytest.raises(ValueError, match="uses the gradient of its own backward"):
            method.compute_losses(None, None, None, step=2)
    assert set(FINETUNE_NAMES.values()) == set(METHODS)


def test_every_adversarial_method_defines_the_losses_its_kind_runs():
    for name, cls in METHODS.items():
        needed = "driven_losses" if cls.driven else "losses"
        assert not cls.adversarial or callable(getattr(cls, needed, None)), f"{name} has no {needed}"
