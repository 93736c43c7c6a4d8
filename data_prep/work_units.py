"""The two granularities of sharding: small work units, and the groups that become shard files.

A *unit* is a corpus piece (`data_prep.corpus`) of at most UNIT_BYTES of text (or one row
group, Arrow file or compressed file): small, so that a corpus that is a single file of a
few tens of MB still keeps every worker busy. A *group* is a run of consecutive units of
about `piece_bytes` of input (units of several files included, so a directory of many small
files does not become many tiny shards); each group is written as one shard file per split
and is the unit of resume and of the node partition.

A worker tokenizes a unit into one token stream per split (each document followed by the
separator); the writer packs a group's streams in unit order. Packing the concatenated
streams gives the same rows as packing the group's documents in one pass, so the bytes
depend on the groups alone, never on how many workers tokenized the units.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

from data_prep.corpus import Piece, ReadOptions, ReadStats, plan_pieces, read_document_batches
from data_prep.inputs import InputFile

UNIT_BYTES = 1 << 20
DOCS_PER_BATCH = 2048
SPLITS = ("train", "val")


def plan_groups(files: list[InputFile], options: ReadOptions, piece_bytes: int) -> list[list[Piece]]:
    """The units of every input, in order, cut into groups of about `piece_bytes`."""
    groups: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for unit in plan_pieces(files, options, min(UNIT_BYTES, piece_bytes)):
        current.append(unit)
        size += unit.size
        if size >= piece_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


@dataclass
class UnitTokens:
    """A tokenized unit: per split, its documents' tokens each followed by the separator."""

    streams: dict[str, np.ndarray]
    stats: dict[str, int]  # documents, empty_documents, replaced_characters, val_documents, tokens


def tokenize_unit(unit: Piece, options: ReadOptions, *, val_fraction: float, encode, sep_id: int, dtype) -> UnitTokens:
    stats = ReadStats()
    encoded: dict[str, list[list[int]]] = {split: [] for split in SPLITS}
    val_documents = tokens = 0
    for docs in read_document_batches(unit, options, stats):
        for start in range(0, len(docs), DOCS_PER_BATCH):
            batch = docs[start : start + DOCS_PER_BATCH]
            in_val = [in_validation(text, val_fraction) for text in batch] if val_fraction else [False] * len(batch)
            ids = encode(batch)
            tokens += sum(map(len, ids))
            val_documents += sum(in_val)
            for doc, val in zip(ids, in_val):
                encoded["val" if val else "train"].append(doc)
    streams = {split: _stream(docs, sep_id, dtype) for split, docs in encoded.items()}
    counts = {
        "documents": stats.documents,
        "empty_documents": stats.empty_documents,
        "replaced_characters": stats.replaced_characters,
        "val_documents": val_documents,
        "tokens": tokens,
    }
    return UnitTokens(streams, counts)


def _stream(documents: list[list[int]], sep_id: int, dtype) -> np.ndarray:
    total = sum(map(len, documents)) + len(documents)
    chained = itertools.chain.from_iterable(itertools.chain(doc, (sep_id,)) for doc in documents)
    return np.fromiter(chained, dtype=dtype, count=total)


def in_validation(text: str, fraction: float) -> bool:
    """Deterministic split by document content: the same document lands in the same split anywhere."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64
