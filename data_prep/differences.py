"""The first key two mappings differ in: what an error names when a setting changed."""

from __future__ import annotations


def first_difference(old: dict, new: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted key, old value, new value) of the first differing key in sorted order, looking
    into mappings nested in both; a missing key counts as None. None when they agree."""
    for key in sorted(old.keys() | new.keys()):
        was, now = old.get(key), new.get(key)
        if not _same(was, now):
            if isinstance(was, dict) and isinstance(now, dict):
                return first_difference(was, now, f"{prefix}{key}.") or (f"{prefix}{key}", was, now)
            return f"{prefix}{key}", was, now
    return None


def _same(a: object, b: object) -> bool:
    """Equal, where two NaNs are the same setting (NaN equals nothing, itself included)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
