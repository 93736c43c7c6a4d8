"""Field checks shared by the config dataclasses' ``__post_init__``.

Each raises ValueError as ``name: problem, got value``, naming the field by its own name:
a dataclass does not know where it sits in a run config, so the loader
(`pipeline.train.config`) puts the key path in front once. Types are checked as well as ranges,
because code also builds these dataclasses directly, past the loader's type conversion.
"""

from __future__ import annotations

import math


def choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices`` (at least two, listed in the message)."""
    if value not in choices:
        raise ValueError(f"{name}: expected {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def integer(name: str, value: object, minimum: int, note: str = "") -> None:
    """An int (not a bool) of at least ``minimum``; ``note`` says what the bound value means."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be at least {minimum}{note}, got {value}")


def number(name: str, value: object, positive: bool = False, note: str = "") -> None:
    """A finite int or float, >= 0 (or > 0 when ``positive``): finite, because NaN slips past a `< 0` test."""
    if not _is_number(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: must be a finite number {'> 0' if positive else '>= 0'}{note}, got {value!r}")


def fraction(name: str, value: object, one: bool) -> None:
    """A number in (0, 1], or in (0, 1) when ``one`` is False."""
    if not _is_number(value) or not (0 < value < 1 or (one and value == 1)):
        raise ValueError(f"{name}: must be in (0, 1{']' if one else ')'}, got {value!r}")


def unit_interval(name: str, value: object, one: bool) -> None:
    """A number in [0, 1], or in [0, 1) when ``one`` is False (NaN is in neither)."""
    if not _is_number(value) or not (0 <= value < 1 or (one and value == 1)):
        raise ValueError(f"{name}: must be in [0, 1{']' if one else ')'}, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
