"""Which files a corpus is, and of which kind: what `--input` names (files, directories,
globs) expanded to files, each classified by its name (text, JSON lines, Parquet, Arrow;
compressed or not). Reading them is `data_prep.corpus`."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import UserError

COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "text" | "jsonl" | "parquet" | "arrow"
    compression: str | None = None


def expand_inputs(paths: list[str]) -> list[InputFile]:
    """Files, directories (recursively, hidden entries skipped) and globs, in sorted order."""
    if not paths:
        raise UserError("--input: no input paths given")
    files: list[InputFile] = []
    for given in paths:
        if any(ch in given for ch in "*?["):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                raise UserError(f"{given}: no files match this pattern")
            for match in matches:
                files.extend(_expand_path(Path(match)))
        else:
            path = Path(given)
            if not path.exists():
                raise UserError(f"{given}: no such file or directory")
            files.extend(_expand_path(path))
    if not files:
        raise UserError(f"{' '.join(paths)}: no input files found")
    return files


def _expand_path(path: Path) -> list[InputFile]:
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _hf_dataset_files(path)
        return [f for child in sorted(path.iterdir()) if not child.name.startswith(".") for f in _expand_path(child)]
    return [_classify(path)]


def _classify(path: Path) -> InputFile:
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = (
        suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes and not compression else "")
    )
    if inner == ".parquet":
        if compression:
            raise UserError(f"{path}: compressed Parquet files are not supported (Parquet compresses internally)")
        return InputFile(str(path), "parquet")
    if inner == ".arrow":
        return InputFile(str(path), "arrow")
    kind = "jsonl" if inner in JSONL_SUFFIXES else "text"
    return InputFile(str(path), kind, compression)


def _hf_dataset_files(path: Path) -> list[InputFile]:
    """The Arrow files of a `datasets.save_to_disk` directory, splits in their saved order."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in _hf_dataset_files(path / split)]
    state = json.loads((path / "state.json").read_text())
    return [InputFile(str(path / entry["filename"]), "arrow") for entry in state["_data_files"]]
