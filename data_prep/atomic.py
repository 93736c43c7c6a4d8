"""Crash-safe writes: write to a temporary name beside the target, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or directory or the
complete new one, never a half-written one.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """A per-process temporary name beside `path`, recognisable by `is_temporary`."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def is_temporary(path: Path) -> bool:
    return TMP_MARK in path.name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Make a fully written temporary file visible under its final name."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole, or (a full disk, say) leave no trace and raise."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        tmp.write_bytes(data)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def directory(path: Path, replace: bool = False):
    """Yield an empty temporary directory beside `path` to fill; it becomes `path` in one
    rename when the block ends, and is removed when the block raises.

    `replace`: an existing `path` is removed just before the rename (else the rename fails
    on a non-empty one). One writer per `path` at a time: the temporary has a fixed name, so
    the next write removes what a killed writer left. The files are not fsynced; a caller
    whose files must survive a power cut fsyncs them in the block.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}dir")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if replace and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
