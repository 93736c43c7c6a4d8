"""`atomic.directory`: a directory appears whole under its final name, or not at all."""

from __future__ import annotations

import pytest

from data_prep import atomic


def test_a_finished_block_renames_the_directory_into_place(tmp_path):
    out = tmp_path / "parent" / "out"
    with atomic.directory(out) as tmp:
        assert tmp.parent == out.parent and atomic.is_temporary(tmp) and not out.exists()
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_an_exception_leaves_neither_the_temporary_nor_the_target(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic.directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_existing_target_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError), atomic.directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").is_file()
    with atomic.directory(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_what_a_killed_writer_left_is_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic.directory(out) as left:
        raise RuntimeError
    left.mkdir()
    (left / "stale.txt").write_text("stale")  # what a SIGKILL during the block leaves
    with atomic.directory(out) as tmp:
        assert tmp == left and list(tmp.iterdir()) == []
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []
