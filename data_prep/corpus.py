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
Nothing here holds more than one piece's lines in memory at a time, and no document is
longer than MAX_DOCUMENT_BYTES: a longer one (one 200 MB line, say) is refused naming its
file and line (or row), since tokenizing it alone would take gigabytes. Text and JSON-lines
inputs are UTF-8 text: a NUL byte anywhere in one refuses it as binary, naming the line.
"""

from __future__ import annotations

import codecs
import gzip
import io
import itertools
import json
import lzma
import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from data_prep.errors import UserError
from data_prep.inputs import InputFile

BINARY_PROBE_BYTES = 8192
MAX_DOCUMENT_BYTES = 16 << 20
NEWLINE = b"\n"
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
    """The NUL rule on the file's head, so a binary file fails before any work starts (the
    read checks the rest, `_decoded_blocks`)."""
    with _open_bytes(f) as fh:
        head = _read(fh, BINARY_PROBE_BYTES, f, 0)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise _binary(f"{f.path}:{head.count(NEWLINE, 0, nul) + 1}", nul - head.rfind(NEWLINE, 0, nul))


def _binary(where: str, column: int) -> UserError:
    return UserError(f"{where}: binary file (NUL byte at column {column}); expected UTF-8 text")


def _too_long(where: str, what: str) -> UserError:
    return UserError(
        f"{where}: {what} is longer than {MAX_DOCUMENT_BYTES >> 20} MiB, the most a document may be; "
        "split such documents into smaller ones"
    )


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
        raise UserError(
            f"{f.path}: no column {options.text_field!r} (columns: {', '.join(schema.names)}); set --text-field"
        )
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
    row = 0
    for batch in batches:
        texts = batch.column(options.text_field).to_pylist()
        longest = max(range(len(texts)), key=lambda i: len(texts[i] or ""), default=0)
        if texts and len(texts[longest] or "") > MAX_DOCUMENT_BYTES:  # characters: at least as many bytes
            group = "" if piece.file.kind == "arrow" else f" of row group {piece.start}"
            raise _too_long(f"{piece.file.path}: row {row + longest}{group}", f"column {options.text_field!r}")
        row += len(texts)
        yield [text or "" for text in texts]


def _jsonl_documents(piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[list[str]]:
    for first_line, lines in _decoded_blocks(piece, options, stats):
        yield [
            _jsonl_text(line, piece, line_no, options)
            for line_no, line in enumerate(lines, start=first_line)
            if line.strip()
        ]


def _jsonl_text(line: str, piece: Piece, line_no: int, options: ReadOptions) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{_where(piece, line_no)}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or options.text_field not in record:
        raise UserError(f"{_where(piece, line_no)}: no field {options.text_field!r}; set --text-field")
    text = record[options.text_field]
    if not isinstance(text, str):
        raise UserError(
            f"{_where(piece, line_no)}: field {options.text_field!r} is {type(text).__name__}, not a string"
        )
    return text


def _blank_separated_documents(piece: Piece, options: ReadOptions, stats: ReadStats) -> Iterator[list[str]]:
    current: list[str] = []
    size = 0
    for first_line, lines in _decoded_blocks(piece, options, stats):
        docs = []
        for line_no, line in enumerate(lines, start=first_line):
            if line.strip():
                current.append(line)
                size += len(line) + 1
                if size > MAX_DOCUMENT_BYTES:
                    raise _too_long(_where(piece, line_no), "the blank-line separated document ending after this line")
            elif current:
                docs.append("\n".join(current))
                current, size = [], 0
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
            block = block[len(codecs.BOM_UTF8) :]
        nul = block.find(b"\x00")
        if nul >= 0:
            raise _binary(_where(piece, first_line + block.count(b"\n", 0, nul)), nul - block.rfind(b"\n", 0, nul))
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
    """The piece's bytes in blocks of about READ_BLOCK that end on a line boundary; a line
    longer than MAX_DOCUMENT_BYTES is refused before it is read whole."""
    with _open_bytes(piece.file) as fh:
        if piece.start:
            fh.seek(piece.start)
        remaining = piece.end - piece.start if piece.end >= 0 else -1
        tail, lines, offset = b"", 0, piece.start
        while remaining:
            block = _read(fh, READ_BLOCK if remaining < 0 else min(READ_BLOCK, remaining), piece.file, offset)
            if not block:
                break
            offset += len(block)
            remaining -= len(block) if remaining > 0 else 0
            block = tail + block
            first_end = block.find(NEWLINE)  # only the first line can be longer than a read
            if (first_end if first_end >= 0 else len(block)) > MAX_DOCUMENT_BYTES:
                raise _too_long(_where(piece, lines + 1), "this line")
            cut = block.rfind(NEWLINE) + 1
            if cut:
                lines += block.count(NEWLINE, 0, cut)
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


def _read(fh, size: int, f: InputFile, offset: int) -> bytes:
    """``fh.read(size)``; a compressed file that is damaged, truncated or not of its kind ends
    in one line naming it and how far it decompressed, not in the decompressor's traceback."""
    try:
        return fh.read(size)
    except (OSError, EOFError, lzma.LZMAError, _zstd_error()) as e:
        if not f.compression:
            raise
        raise UserError(
            f"{f.path}: not a valid {f.compression} file: {e} (reading from decompressed byte {offset:,})"
        ) from None


def _zstd_error() -> type[Exception]:
    """Evaluated only when a read fails (an except clause's tuple is), so zstandard stays unimported otherwise."""
    import zstandard

    return zstandard.ZstdError


def _open_bytes(f: InputFile):
    if f.compression == "gzip":
        return gzip.open(f.path, "rb")
    if f.compression == "xz":
        return lzma.open(f.path, "rb")
    if f.compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(f.path, "rb"), closefd=True))
    return open(f.path, "rb")
