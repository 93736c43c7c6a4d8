"""Size and sha256 of a checkpoint's files, recorded at save time and checked before a resume.

A checkpoint can be complete when written and damaged later (a truncated copy, a failing
disk, a file edited by hand). Its `complete.json` lists every file with its size and
sha256, so the resume finds the damage before DeepSpeed loads half of it, and can fall back
to the previous checkpoint. Hashing runs in threads: hashlib releases the GIL, so several
files are read and hashed at once.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 20
THREADS = 8


def digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def file_digests(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {size, sha256}} for the files `names` (relative to `directory`)."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return dict(zip(names, pool.map(lambda name: digest(directory / name), names)))


def problems(directory: Path, recorded: dict[str, dict]) -> list[str]:
    """What differs between the files in `directory` and their record, one line per file."""

    def check(name: str) -> str | None:
        path, expected = directory / name, recorded[name]
        if not path.is_file():
            return f"{name}: missing"
        size = path.stat().st_size
        if size != expected["size"]:  # before hashing: a truncated file costs no read
            return f"{name}: {size:,} bytes, {expected['size']:,} when saved"
        if digest(path)["sha256"] != expected["sha256"]:
            return f"{name}: contents changed since it was saved (sha256)"
        return None

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return [p for p in pool.map(check, sorted(recorded)) if p]
