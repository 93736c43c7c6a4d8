"""Which command wrote a directory, and so what a command may replace or write into.

Every directory an alum command creates (a tokenizer, shards, an export, a run directory)
holds a marker, `.alum-output.json`: the command that wrote it and the top-level names it
wrote. `--overwrite` replaces only a directory whose marker names the same command and
that holds nothing but those names: a user's directory that happens to hold a
`manifest.json`, another command's output, an output the user has put a file of their own
into, and an output written before the marker existed are all refused in one line and left
alone. A file name is no marker: anyone's directory can hold a `config.json`.

Before anything is written, an `--out` that is, contains or lies inside one of the
command's inputs, or lies inside another command's output, is refused too: replacing it
would delete the input, and writing into it would change what a later run reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from data_prep import atomic
from data_prep.errors import UserError

MARKER = ".alum-output.json"


def mark(directory: Path, command: str, names: Iterable[str] = ()) -> None:
    """Record that `command` wrote `directory`; `names`: the top-level entries it wrote,
    which a later `--overwrite` may replace with it."""
    atomic.write_json(Path(directory) / MARKER, {"written_by": command, "names": sorted(set(names) - {MARKER})})


def _marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("written_by"), str) else None


def written_by(directory: Path) -> str | None:
    """The command that wrote `directory`, from its marker; None for any other directory."""
    marker = _marker(directory)
    return marker["written_by"] if marker else None


def check_out(out: Path, command: str, inputs: Iterable[tuple[str, str | Path]], overwrite: bool) -> None:
    """What the `--out` of a command that writes its output whole must pass, before any work."""
    check_apart(out, inputs)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; use --overwrite to replace it")
    if out.exists():
        check_replaceable(out, command)


def check_apart(out: Path, inputs: Iterable[tuple[str, str | Path]]) -> None:
    """Refuse an `out` that is, contains or lies inside one of `inputs` ((what, path) pairs:
    ("input", "corpus/a.txt"), ("--run-dir", "runs/x")), or lies inside a directory another
    command wrote. Paths are compared resolved, so a symlink or `..` does not hide a match."""
    real = Path(os.path.realpath(out))
    for what, path in inputs:
        other = Path(os.path.realpath(path))
        relation = (
            "is"
            if other == real
            else "lies inside"
            if other in real.parents
            else "contains"
            if real in other.parents
            else None
        )
        if relation:
            raise UserError(
                f"--out {out}: {relation} the {what} {path}; choose an --out apart from what the command reads"
            )
    for parent in real.parents:
        owner = written_by(parent)
        if owner:
            raise UserError(f"--out {out}: lies inside {parent}, which {owner} wrote; choose an --out outside it")


def check_replaceable(out: Path, command: str) -> None:
    """Refuse to replace `out` unless `command` wrote it and nothing else has been put in it."""
    marker = _marker(out)
    if marker is None or marker["written_by"] != command:
        why = (
            f"{marker['written_by']} wrote it"
            if marker
            else f"it has no {MARKER} (another program's directory, or written before alum marked its outputs)"
        )
        raise UserError(
            f"{out}: --overwrite replaces only what {command} wrote, and {why}; nothing was deleted: delete it "
            "yourself or choose another --out"
        )
    known = {*marker.get("names", ()), MARKER}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in known and not atomic.is_temporary(p))
    if foreign:
        raise UserError(
            f"{out / foreign[0]}: not written by {command}; --overwrite would delete it with {out}, so nothing was "
            "deleted: "
            "move it out, or choose another --out"
        )
