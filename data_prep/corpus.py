"""Reading raw corpora as a stream of documents.

Inputs are files, directories or globs. Supported kinds:
- text (any extension not listed below): one document per line, or documents separated
  by blank lines (`txt_docs="blank"`);
- JSON lines (`.jsonl`, `.json`, `.ndjson`): one object per line, text in `text_field`;
- Parquet (`.parquet`): text in column `text_field`;
- directories written by `datasets.save_to_disk` (a `Dataset` or a `DatasetDict`).
Text and JSON lines may be compressed (`.gz`, `.xz`, `.zst`).

The corpus is cut into *pieces*, the unit of parallel work: byte ranges of uncompressed
text ending on a document boundary, one Parquet row group, one Arrow file, or a whole
compressed file. Piece boundaries depend only on the files and `piece_bytes`, so anything
derived piece by piece is independent of how many processes or machines do the work.
Nothing here holds more than one piece's lines in memory at a time.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import itertools
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from data_prep.errors import UserError

COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
BINARY_PROBE_BYTES = 8192
READ_BLOCK = 4 << 20
REPLACEMENT = "\ufffd"
REPLACEMENT_UTF8 = REPLACEMENT.encode()


@dataclass(frozen=True)
class ReadOptions:
    """How to find documents in the inputs (part of a dataset's identity)."""

    text_field: str = "text"
    txt_docs: str = "line"  # "line": a document per line; "blank": blank-line separated
    utf8_errors: str = "replace"  # "replace" (and count) or "fail"

    def __post_init__(self):
        if self.txt_docs not in ("line", "blank"):
            raise UserError(f"--txt-docs: expected 'line' or 'blank', got {self.txt_docs!r}")
        if self.utf8_errors not in ("replace", "fail"):
            raise UserError(f"--utf8-errors: expected 'replace' or 'fail', got {self.utf8_errors!r}")


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "text" | "jsonl" | "parquet" | "arrow"
    compression: str | None = None


@dataclass(frozen=True)
class Piece:
    """A part of one input file: bytes [start, end) of text/JSONL, or row group `start`."""

    file: InputFile
    start: int = 0
    end: int = -1  # -1: to the end of the file
    size: int = 0  # bytes of input it covers (a row group: its uncompressed size), to balance work


@dataclass
class ReadStats:
    documents: int = 0
    empty_documents: int = 0
    replaced_characters: int = 0

    def add(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.empty_documents += other.empty_documents
        self.replaced_characters += other.replaced_characters


# ----------------------------------------------------------------------------- inputs


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
        return [
            f
            for child in sorted(path.iterdir())
            if not child.name.startswith(".")
            for f in _expand_path(child)
        ]
    return [_classify(path)]


def _classify(path: Path) -> InputFile:
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes and not compression else "")
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


# ----------------------------------------------------------------------------- pieces


def plan_pieces(files: list[InputFile], options: ReadOptions, piece_bytes: int | None) -> list[Piece]:
    """Cut every input into pieces; checks each file can be read before any work starts."""
    pieces: list[Piece] = []
    for f in files:
        if f.kind == "parquet":
            pieces.extend(_parquet_pieces(f, options))
        elif f.kind == "arrow":
            _check_arrow(f, options)
            pieces.append(Piece(f, size=os.path.getsize(f.path)))
        else:
            _check_not_binary(f)
            if f.compression or piece_bytes is None:
                pieces.append(Piece(f, size=os.path.getsize(f.path)))
            else:
                pieces.extend(_text_pieces(f, options, piece_bytes))
    return pieces


def _text_pieces(f: InputFile, options: ReadOptions, piece_bytes: int) -> list[Piece]:
    size = os.path.getsize(f.path)
    bounds = [0]
    with open(f.path, "rb") as fh:
        offset = piece_bytes
        while offset < size:
            b = _next_document_boundary(fh, offset, blank=(f.kind == "text" and options.txt_docs == "blank"))
            if bounds[-1] < b < size:
                bounds.append(b)
            offset = max(offset + piece_bytes, b + 1)
    bounds.append(size)
    return [Piece(f, s, e, e - s) for s, e in zip(bounds, bounds[1:])]


def _next_document_boundary(fh, offset: int, blank: bool) -> int:
    """First line start at or after `offset` (after a blank line when documents are blank-separated)."""
    fh.seek(offset - 1)
    fh.readline()  # finish the line that holds byte offset-1
    if not blank:
        return fh.tell()
    while True:
        line = fh.readline()
        if not line or not line.strip():
            return fh.tell()


def _check_not_binary(f: InputFile) -> None:
    with _open_bytes(f) as fh:
        head = fh.read(BINARY_PROBE_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{f.path}: binary file (NUL byte at offset {nul}); expected UTF-8 text")


def _parquet_pieces(f: InputFile, options: ReadOptions) -> list[Piece]:
    import pyarrow.parquet as pq  # only for Parquet inputs: it costs a noticeable share of start-up

    try:
        meta = pq.ParquetFile(f.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{f.path}: not a readable Parquet file ({e})") from None
    _check_text_column(f, meta.schema_arrow, options)
    groups = meta.metadata
    return [Piece(f, g, g + 1, groups.row_group(g).total_byte_size) for g in range(groups.num_row_groups)]


def _check_arrow(f: InputFile, options: ReadOptions) -> None:
    try:
        with pa.memory_map(f.path) as source:
            schema = pa.ipc.open_stream(source).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{f.path}: not a readable Arrow stream file ({e})") from None
    _check_text_column(f, schema, options)


def _check_text_column(f: InputFile, schema: pa.Schema, options: ReadOptions) -> None:
    if options.text_field not in schema.names:
        raise UserError(f"{f.path}: no column {options.text_field!r} (columns: {', '.join(schema.names)}); set --text-field")
    kind = schema.field(options.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{f.path}: column {options.text_field!r} holds {kind}, not text")


# ----------------------------------------------------------------------------- documents


def read_documents(piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """The non-empty documents of a piece, stripped of surrounding whitespace."""
    return itertools.chain.from_iterable(read_document_batches(piece, options, stats))


def read_document_batches(piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[list[str]]:
    """`read_documents` in lists of a block's worth (the fast path for the shard workers)."""
    if piece.file.kind in ("parquet", "arrow"):
        raw = _column_documents(piece, options)
    elif piece.file.kind == "jsonl":
        raw = _jsonl_documents(piece, options, stats)
    elif options.txt_docs == "blank":
        raw = _blank_separated_documents(piece, options, stats)
    else:
        raw = (lines for _, lines in _decoded_blocks(piece, options, stats))
    for texts in raw:
        docs = [t for t in map(str.strip, texts) if t]
        stats.documents += len(docs)
        stats.empty_documents += len(texts) - len(docs)
        yield docs


def _column_documents(piece: Piece, options: ReadOptions) -> Iterator[list[str]]:
    if piece.file.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(piece.file.path).read_row_group(piece.start, columns=[options.text_field])
        batches = table.to_batches()
    else:
        batches = pa.ipc.open_stream(pa.memory_map(piece.file.path))
    for batch in batches:
        yield [text or "" for text in batch.column(options.text_field).to_pylist()]


def _jsonl_documents(piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[list[str]]:
    for first_line, lines in _decoded_blocks(piece, options, stats):
        yield [_jsonl_text(line, piece, line_no, options) for line_no, line in enumerate(lines, start=first_line) if line.strip()]


def _jsonl_text(line: str, piece: Piece, line_no: int, options: ReadOptions) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{_where(piece, line_no)}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or options.text_field not in record:
        raise UserError(f"{_where(piece, line_no)}: no field {options.text_field!r}; set --text-field")
    text = record[options.text_field]
    if not isinstance(text, str):
        raise UserError(f"{_where(piece, line_no)}: field {options.text_field!r} is {type(text).__name__}, not a string")
    return text


def _blank_separated_documents(piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[list[str]]:
    current: list[str] = []
    for _, lines in _decoded_blocks(piece, options, stats):
        docs = []
        for line in lines:
            if line.strip():
                current.append(line)
            elif current:
                docs.append("\n".join(current))
                current = []
        yield docs
    if current:
        yield ["\n".join(current)]


def _decoded_blocks(piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[tuple[int, list[str]]]:
    """(number of the block's first line within the piece, its lines without newlines).

    A block of whole lines is decoded with one call (the fast path); only a block holding
    invalid UTF-8 is decoded line by line, to count replacements or name the line.
    """
    first_line = 1
    for block_no, block in enumerate(_line_blocks(piece)):
        if block_no == 0 and piece.start == 0 and block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8):]
        try:
            lines = block.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raw_lines = block.split(b"\n")
            lines = [_decode_line(raw, piece, first_line + i, options, stats) for i, raw in enumerate(raw_lines)]
        if lines[-1] == "":
            lines.pop()  # the block ended with a newline
        if b"\r" in block:
            lines = [line.rstrip("\r") for line in lines]
        yield first_line, lines
        first_line += len(lines)


def _line_blocks(piece: Piece) -> Iterator[bytes]:
    """The piece's bytes in blocks of about READ_BLOCK that end on a line boundary."""
    with _open_bytes(piece.file) as fh:
        if piece.start:
            fh.seek(piece.start)
        remaining = piece.end - piece.start if piece.end >= 0 else -1
        tail = b""
        while remaining:
            block = fh.read(READ_BLOCK if remaining < 0 else min(READ_BLOCK, remaining))
            if not block:
                break
            remaining -= len(block) if remaining > 0 else 0
            block = tail + block
            cut = block.rfind(b"\n") + 1
            if cut:
                yield block[:cut]
            tail = block[cut:]
        if tail:
            yield tail


def _decode_line(raw: bytes, piece: Piece, line_no: int, options: ReadOptions, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if options.utf8_errors == "fail":
            raise UserError(
                f"{_where(piece, line_no)}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "use --utf8-errors replace to replace and count such bytes"
            ) from None
    text = raw.decode("utf-8", errors="replace")
    # U+FFFD characters that were not in the input are the replaced sequences.
    stats.replaced_characters += text.count(REPLACEMENT) - raw.count(REPLACEMENT_UTF8)
    return text


def _where(piece: Piece, line_no: int) -> str:
    """FILE:LINE with the line number counted from the start of the file."""
    before = 0
    if piece.start:
        with open(piece.file.path, "rb") as fh:
            remaining = piece.start
            while remaining:
                block = fh.read(min(remaining, 1 << 20))
                before += block.count(b"\n")
                remaining -= len(block)
    return f"{piece.file.path}:{before + line_no}"


def _open_bytes(f: InputFile):
    if f.compression == "gzip":
        return gzip.open(f.path, "rb")
    if f.compression == "xz":
        return lzma.open(f.path, "rb")
    if f.compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(f.path, "rb"), closefd=True))
    return open(f.path, "rb")
