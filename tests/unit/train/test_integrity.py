"""Checkpoint file records (pipeline.train.integrity): what a damaged file looks like to the resume."""

from __future__ import annotations

import hashlib

from pipeline.train.integrity import digest, file_digests, problems


def test_digests_are_size_and_sha256_and_every_kind_of_damage_is_named(tmp_path):
    (tmp_path / "sub").mkdir()
    contents = {"a.pt": b"x" * 3_000_000, "sub/b.json": b'{"step": 8}', "c": b""}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    recorded = file_digests(tmp_path, sorted(contents))
    assert recorded == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in contents.items()
    }
    assert digest(tmp_path / "a.pt") == recorded["a.pt"]
    assert problems(tmp_path, recorded) == []

    (tmp_path / "a.pt").write_bytes(b"x" * 1_000_000)  # truncated
    (tmp_path / "sub" / "b.json").write_bytes(b'{"step": 9}')  # same size, altered
    (tmp_path / "c").unlink()
    assert problems(tmp_path, recorded) == [
        "a.pt: 1,000,000 bytes, 3,000,000 when saved",
        "c: missing",
        "sub/b.json: contents changed since it was saved (sha256)",
    ]
