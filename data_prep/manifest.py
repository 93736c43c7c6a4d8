"""The shard directory's contract: `manifest.json`, the Arrow schema, and verification.

A shard directory holds `train/*.arrow` and `val/*.arrow` (Arrow IPC stream files with one
column `input_ids`, a fixed-size list of `seq_len` token ids, uint16 when the vocabulary
fits, else int32) and `manifest.json`:

    format_version, seq_len, dtype, num_sequences, num_tokens (non-padding tokens),
    tokenizer {sha256 (the fingerprint), kind (sentencepiece | hf), vocab_size, style}, special_token_ids {pad, unk,
    cls, sep, mask},
    splits {name: {num_sequences, num_tokens, shards: [{path, num_rows, num_tokens, bytes, sha256}]}},
    stats {documents, empty_documents, val_documents, replaced_characters, tokens, padding_tokens},
    settings (everything that determined the bytes: what a re-run is compared against).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep import atomic
from data_prep.differences import first_difference
from data_prep.errors import UserError
from data_prep.work_units import UNIT_BYTES

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAT_KEYS = ("documents", "empty_documents", "val_documents", "replaced_characters", "tokens", "padding_tokens")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def shard_schema(seq_len: int, dtype: str) -> pa.Schema:
    return pa.schema([("input_ids", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), seq_len))])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_identity(settings, tokenizer, files, num_pieces: int) -> dict:
    """The settings and inputs that determine a dataset's bytes."""
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": settings.seq_len,
        "dtype": token_dtype(tokenizer.vocab_size),
        "val_fraction": settings.val_fraction,
        "piece_bytes": settings.piece_bytes,
        "unit_bytes": min(UNIT_BYTES, settings.piece_bytes),
        "read": {
            "text_field": settings.read.text_field,
            "txt_docs": settings.read.txt_docs,
            "utf8_errors": settings.read.utf8_errors,
        },
        "tokenizer": {
            "sha256": tokenizer.sha256,
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "style": tokenizer.style,
        },
        "special_token_ids": tokenizer.special_token_ids,
        "inputs": [{"path": f.path, "bytes": Path(f.path).stat().st_size} for f in files],
        "num_pieces": num_pieces,
    }


FLAGS = {
    "seq_len": "--seq-len",
    "val_fraction": "--val-fraction",
    "piece_bytes": "--piece-mb",
    "unit_bytes": "--piece-mb",
    "read.text_field": "--text-field",
    "read.txt_docs": "--txt-docs",
    "read.utf8_errors": "--utf8-errors",
    "tokenizer": "--tokenizer",
    "special_token_ids": "--tokenizer",
    "dtype": "--tokenizer",
    "inputs": "--input",
    "num_pieces": "--input or --piece-mb",
}


def describe_difference(old: dict, new: dict) -> str:
    """The first setting two dataset identities differ in, with the `alum shard` flag that sets it."""
    difference = first_difference(old, new)
    if difference is None:
        return "same settings"
    key, was, now = difference
    flag = FLAGS.get(key) or FLAGS.get(key.split(".")[0], "")
    values = (
        f"{was!r} then, {now!r} now"
        if not isinstance(was, (dict, list)) and not isinstance(now, (dict, list))
        else "differs"
    )
    return f"{key} {values}" + (f": {flag}" if flag else "")


def build(identity: dict, records: list[dict]) -> dict:
    """The manifest of a complete dataset from its piece records, in piece order."""
    splits = {}
    for record in records:
        for shard in record["shards"]:
            split = splits.setdefault(shard["split"], {"num_sequences": 0, "num_tokens": 0, "shards": []})
            split["num_sequences"] += shard["num_rows"]
            split["num_tokens"] += shard["num_tokens"]
            split["shards"].append({k: shard[k] for k in ("path", "num_rows", "num_tokens", "bytes", "sha256")})
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": identity["seq_len"],
        "dtype": identity["dtype"],
        "num_sequences": sum(s["num_sequences"] for s in splits.values()),
        "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "tokenizer": identity["tokenizer"],
        "special_token_ids": identity["special_token_ids"],
        "splits": splits,
        "stats": {key: sum(r["stats"][key] for r in records) for key in STAT_KEYS},
        "settings": identity,
    }


def write(out: Path, data: dict) -> Path:
    path = Path(out) / MANIFEST
    atomic.write_json(path, data)
    return path


def load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def read(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory}: no {MANIFEST}; not a finished shard directory")
    data = load_json(path)
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {data.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    return data


def verify(directory: str | Path) -> dict:
    """Check every shard's checksum, schema, row count and token range; raise on the first problem."""
    directory = Path(directory)
    data = read(directory)
    schema = shard_schema(data["seq_len"], data["dtype"])
    vocab = data["tokenizer"]["vocab_size"]
    shards = 0
    for name, split in data["splits"].items():
        for shard in split["shards"]:
            verify_shard(directory, shard, schema, vocab)
            shards += 1
        if sum(s["num_rows"] for s in split["shards"]) != split["num_sequences"]:
            raise UserError(f"{directory / MANIFEST}: split {name!r} row counts do not add up to num_sequences")
    return {"shards": shards, "num_sequences": data["num_sequences"], "num_tokens": data["num_tokens"]}


def verify_shard(directory: Path, shard: dict, schema: pa.Schema, vocab_size: int) -> None:
    path = shard_path(directory, shard)
    check_sha256(path, shard)
    table = read_shard(path, shard, schema)
    for chunk in table.column("input_ids").chunks:
        ids = chunk.values.to_numpy()
        if len(ids) and int(ids.max()) >= vocab_size:
            raise UserError(f"{path}: token id {int(ids.max())} is outside the vocabulary ({vocab_size})")


def shard_path(directory: Path, shard: dict) -> Path:
    """The path of a manifest's shard, checked to lie inside the shard directory and to exist
    with the recorded size (no read). A manifest is data from wherever the directory came
    from: an absolute path, a `..` or a symbolic link out of the directory would read (and
    name in errors) any file of the machine."""
    relative = Path(shard["path"])
    path = directory / relative
    real_directory = Path(directory).resolve()
    if relative.is_absolute() or ".." in relative.parts or real_directory not in path.resolve().parents:
        raise UserError(
            f"{directory / MANIFEST}: shard path {str(relative)!r} leads outside the shard directory; "
            "a manifest names its shards relative to it (as `alum shard` writes them)"
        )
    if not path.is_file():
        raise UserError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise UserError(f"{path}: {size} bytes, the manifest says {shard['bytes']} (truncated or altered)")
    return path


def check_sha256(path: Path, shard: dict) -> None:
    """Catches altered bytes of the right size: reads the whole file."""
    if file_sha256(path) != shard["sha256"]:
        raise UserError(f"{path}: sha256 does not match the manifest (altered)")


def read_shard(path: Path, shard: dict, schema: pa.Schema) -> pa.Table:
    """The shard's table, memory-mapped (its buffers stay valid after the file is closed),
    checked for the schema and row count the manifest records."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid as e:
        raise UserError(f"{path}: not a readable Arrow stream ({e})") from None
    if not table.schema.equals(schema):
        raise UserError(f"{path}: schema {_columns(table.schema)} differs from the expected {_columns(schema)}")
    if table.num_rows != shard["num_rows"]:
        raise UserError(f"{path}: {table.num_rows} rows, the manifest says {shard['num_rows']}")
    return table


def _columns(schema: pa.Schema) -> str:
    """A schema on one line (its str() spans several)."""
    return ", ".join(f"{field.name}: {field.type}" for field in schema)
