"""Typed configs from YAML mappings: a frozen dataclass tree built from nested dicts, with
every problem one line naming its dotted key (an unknown key with a "did you mean", a wrong
type, a dataclass's own check). YAML's types are converted as a user means them: an int
where a float is expected, YAML 1.1's "1e-12" string as a float, a list as a tuple of entries."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from data_prep.errors import UserError


def build_dataclass(cls, data: Any, prefix: str = ""):
    """An instance of the dataclass `cls` from a mapping (YAML's), nested dataclasses and
    tuples of them included; `prefix` is the dotted key `data` sits at, for the errors."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
        guess = f"did you mean {prefix}{close[0]}? " if close else ""
        raise UserError(f"{prefix}{unknown[0]}: unknown config key ({guess}known: {', '.join(sorted(names))})")
    values = {name: _convert(hints[name], data[name], f"{prefix}{name}") for name in data}
    try:
        return cls(**values)
    except ValueError as e:  # a dataclass names its own field; only here is the path to it known
        raise UserError(f"{prefix}{e}") from None


def _convert(kind, value: Any, key: str):
    if dataclasses.is_dataclass(kind):
        return build_dataclass(kind, value, f"{key}.")
    if typing.get_origin(kind) is tuple:  # tuple[Entry, ...]: a YAML list of mappings
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        entry = typing.get_args(kind)[0]
        return tuple(build_dataclass(entry, item, f"{key}[{i}].") for i, item in enumerate(value))
    options = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        else (kind,)
    )
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{key}: must be set (got null)")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _is_float(value):
            return float(value)  # YAML 1.1 reads "1e-12" (no dot) as a string
        if option is str and isinstance(value, str):
            return value
        if option is dict and isinstance(value, dict):
            return value
    expected = " or ".join(o.__name__ for o in options if o is not type(None))
    raise UserError(f"{key}: expected {expected}, got {value!r}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
