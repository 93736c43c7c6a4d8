"""The first key two mappings differ in: what an error names when a setting changed."""

from __future__ import annotations


def first_difference(old: dict, new: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted key, old value, new value) of the first differing key in sorted order, looking
    into mappings nested in both; a missing key counts as None. None when they agree."""
    for key in sorted(old.keys() | new.keys()):
        was, now = old.get(key), new.get(key)
        if was != now:
            if isinstance(was, dict) and isinstance(now, dict):
                return first_difference(was, now, f"{prefix}{key}.") or (f"{prefix}{key}", was, now)
            return f"{prefix}{key}", was, now
    return None
