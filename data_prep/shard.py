"""`alum shard`: tokenize a corpus in parallel and write fixed-length Arrow shards.

Work is split into the corpus pieces of `data_prep.corpus` (byte ranges ending on a
document boundary, row groups, whole compressed files). Each piece is read, tokenized,
split into train/validation by document hash, packed (`data_prep.packing`) and written as
its own shard files by one worker process. Because a piece's output depends only on the
piece, the bytes written never depend on `--workers`, and `--num-nodes N --node-rank R`
simply gives node R the pieces i with i % N == R.

Crash safety and resume: shard files are written under temporary names and renamed when
complete; then a small record of the piece (its shards, their sha256, counts) is written
to `.progress/`. A re-run skips pieces with records. When every piece has a record, the
node that notices writes `manifest.json` (see `data_prep.manifest`) and removes the
bookkeeping.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import queue
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep import atomic, manifest
from data_prep.corpus import Piece, ReadOptions, ReadStats, expand_inputs, plan_pieces, read_document_batches
from data_prep.errors import UserError
from data_prep.packing import Packer
from data_prep.tokenizer import TokenizerInfo, load_tokenizer

MIN_SEQ_LEN = 8
DOCS_PER_BATCH = 2048
ROWS_PER_RECORD_BATCH = 1024
PROGRESS_DIR = ".progress"
STATE_FILE = ".shard-state.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardSettings:
    """Everything that determines the output bytes (workers and node count do not)."""

    seq_len: int
    val_fraction: float = 0.0
    piece_bytes: int = 64 << 20
    read: ReadOptions = ReadOptions()

    def check(self) -> None:
        if self.seq_len < MIN_SEQ_LEN:
            raise UserError(f"--seq-len {self.seq_len} is too small: rows need at least {MIN_SEQ_LEN} tokens ([CLS] and [SEP] take 2)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.piece_bytes < 4096:
            raise UserError(f"--piece-mb: pieces must be at least 4 KiB, got {self.piece_bytes} bytes")


def shard_corpus(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out: str | Path,
    settings: ShardSettings,
    workers: int = 1,
    num_nodes: int = 1,
    node_rank: int = 0,
    overwrite: bool = False,
) -> dict:
    """Shard the inputs into `out`; returns a summary of the work this call did."""
    started = time.perf_counter()
    out = Path(out)
    settings.check()
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if not 0 <= node_rank < num_nodes:
        raise UserError(f"--node-rank {node_rank}: must be in [0, {num_nodes}) for --num-nodes {num_nodes}")
    tokenizer = load_tokenizer(tokenizer_dir)
    files = expand_inputs(inputs)
    pieces = plan_pieces(files, settings.read, settings.piece_bytes)
    identity = manifest.dataset_identity(settings, tokenizer, files, len(pieces))

    if _already_complete(out, identity, overwrite):
        return {"out": str(out), "already_complete": True, **manifest.read(out)["stats"]}
    created = _prepare_output(out, identity, overwrite)

    mine = [i for i in range(len(pieces)) if i % num_nodes == node_rank]
    done = set(_finished_pieces(out))
    todo = [i for i in mine if i not in done]
    resumed = len(mine) - len(todo)
    if resumed:
        print(f"resuming: {resumed} of {len(mine)} pieces already done")
    job = _PieceJob(tokenizer, settings, out)
    try:
        stats = _run_pieces(job, pieces, todo, workers)
    except UserError:
        if created:  # bad input: the inputs must change, so nothing here can be resumed
            shutil.rmtree(out, ignore_errors=True)
        raise

    summary = {"out": str(out), "pieces_done": len(todo), "pieces_resumed": resumed, **stats}
    records = _finished_pieces(out)
    if len(records) == len(pieces):
        summary["manifest"] = str(finalize(out, created_out=created))
    else:
        summary["pieces_missing"] = len(pieces) - len(records)
    summary["seconds"] = time.perf_counter() - started
    return summary


def finalize(out: str | Path, created_out: bool = False) -> Path:
    """Write `manifest.json` from the piece records once every piece is done (`alum merge`)."""
    out = Path(out)
    state_path = out / STATE_FILE
    if not state_path.is_file():
        if (out / manifest.MANIFEST).is_file():
            return out / manifest.MANIFEST
        raise UserError(f"{out}: not a shard directory in progress (no {STATE_FILE})")
    identity = manifest.load_json(state_path)
    records = _finished_pieces(out)
    missing = sorted(set(range(identity["num_pieces"])) - set(records))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise UserError(f"{out}: {len(missing)} of {identity['num_pieces']} pieces are not done yet ({shown}); run the remaining nodes")
    data = manifest.build(identity, [records[i] for i in sorted(records)])
    if data["stats"]["documents"] == 0:
        _remove_outputs(out, created_out)
        raise UserError(f"{', '.join(f['path'] for f in identity['inputs'])}: no documents in the inputs (empty or whitespace only)")
    path = manifest.write(out, data)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    state_path.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- output dir


def _already_complete(out: Path, identity: dict, overwrite: bool) -> bool:
    path = out / manifest.MANIFEST
    if overwrite or not path.is_file() or (out / STATE_FILE).exists():
        return False
    existing = manifest.read(out)
    if existing["settings"] != identity:
        raise UserError(f"{out}: already holds a different dataset ({manifest.describe_difference(existing['settings'], identity)}); use --overwrite to replace it")
    return True


def _prepare_output(out: Path, identity: dict, overwrite: bool) -> bool:
    """Create or adopt the output directory; True when this run created it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        state = out / STATE_FILE
        ours = state.is_file() or (out / manifest.MANIFEST).is_file()
        if not ours:
            raise UserError(f"{out}: exists and is not a shard directory; choose an empty or new --out")
        if overwrite:
            shutil.rmtree(out)
        elif manifest.load_json(state) != identity:
            raise UserError(f"{out}: holds a different unfinished dataset ({manifest.describe_difference(manifest.load_json(state), identity)}); use --overwrite to replace it")
        else:
            _remove_temporaries(out)
            return False
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    atomic.write_json(out / STATE_FILE, identity)
    return created


def _remove_temporaries(out: Path) -> None:
    """Leftovers of an interrupted run: never complete, never used."""
    for path in out.rglob("*"):
        if path.is_file() and atomic.is_temporary(path):
            path.unlink()


def _remove_outputs(out: Path, created_out: bool) -> None:
    for name in (*SPLITS, PROGRESS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / STATE_FILE).unlink(missing_ok=True)
    if created_out and not any(out.iterdir()):
        out.rmdir()


def _finished_pieces(out: Path) -> dict[int, dict]:
    records = {}
    for path in sorted((out / PROGRESS_DIR).glob("piece-*.json")):
        record = manifest.load_json(path)
        if all((out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["bytes"] for s in record["shards"]):
            records[record["piece"]] = record
    return records


# ----------------------------------------------------------------------------- work


@dataclass(frozen=True)
class _PieceJob:
    """What a worker needs to process any piece (sent once per worker)."""

    tokenizer: TokenizerInfo
    settings: ShardSettings
    out: Path


def _run_pieces(job: _PieceJob, pieces: list[Piece], todo: list[int], workers: int) -> dict:
    """Process the pieces in `todo`, recording each as it completes; returns their summed stats."""
    totals: collections.Counter = collections.Counter()

    def record(result: dict, bar: _ProgressBar) -> None:
        atomic.write_json(job.out / PROGRESS_DIR / f"piece-{result['piece']:06d}.json", result)
        totals.update(result["stats"])
        bar.piece_done()

    if workers == 1 or len(todo) <= 1:
        _worker_init(job, None)
        with _ProgressBar(len(todo)) as bar:
            for i in todo:
                record(_process_piece((i, pieces[i]), report=bar.add), bar)
        return _summed(totals)
    # fork: workers start in milliseconds and inherit the job. The bar (and its monitor
    # thread) is created only after the fork.
    context = multiprocessing.get_context("fork")
    updates = context.Queue()
    with context.Pool(min(workers, len(todo)), initializer=_worker_init, initargs=(job, updates)) as pool:
        results = pool.imap_unordered(_process_piece, [(i, pieces[i]) for i in todo])
        with _ProgressBar(len(todo)) as bar:
            for _ in todo:
                record(_next_result(results, updates, bar), bar)
            _drain(updates, bar)
    return _summed(totals)


def _summed(totals: collections.Counter) -> dict:
    return {key: totals[key] for key in (*manifest.STAT_KEYS, "sequences")}


def _next_result(results, updates, bar: "_ProgressBar") -> dict:
    """Wait for the next finished piece, showing the workers' progress meanwhile."""
    while True:
        _drain(updates, bar)
        try:
            return results.next(timeout=0.25)
        except multiprocessing.TimeoutError:
            continue


def _drain(updates, bar: "_ProgressBar") -> None:
    while True:
        try:
            bar.add(*updates.get_nowait())
        except queue.Empty:
            return


class _ProgressBar:
    """Pieces done, with documents, tokens and tokens/s as they are tokenized."""

    def __init__(self, pieces: int):
        self.bar = tqdm(total=pieces, desc="sharding", unit=" pieces", disable=None)
        self.started = time.perf_counter()
        self.documents = self.tokens = 0

    def add(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(docs=self.documents, tokens=self.tokens, tok_per_s=f"{rate:,.0f}", refresh=False)

    def piece_done(self) -> None:
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


_worker: dict = {}


def _worker_init(job: _PieceJob, progress) -> None:
    _worker.update(job=job, processor=job.tokenizer.processor(), progress=progress)


def _process_piece(task: tuple[int, Piece], report=None) -> dict:
    """Read, tokenize, split, pack and write one piece; returns its progress record."""
    index, piece = task
    job: _PieceJob = _worker["job"]
    settings, ids = job.settings, job.tokenizer.special_token_ids
    report = report or (lambda docs, tokens: _worker["progress"].put((docs, tokens)))
    dtype = manifest.token_dtype(job.tokenizer.vocab_size)
    writers = {split: _ShardWriter(job.out / split / f"{index:06d}.arrow", settings.seq_len, dtype) for split in SPLITS}
    packers = {split: Packer(settings.seq_len, ids["cls"], ids["sep"], ids["pad"], dtype) for split in SPLITS}
    stats = ReadStats()
    counts = {"val_documents": 0, "tokens": 0}
    batches: dict[str, list[str]] = {split: [] for split in SPLITS}

    def flush(split: str) -> None:
        docs = batches[split]
        if docs:
            encoded = _worker["processor"].encode(docs, num_threads=1)
            tokens = sum(map(len, encoded))  # before the packer appends separators
            counts["tokens"] += tokens
            writers[split].write(packers[split].add(encoded))
            report(len(docs), tokens)
            batches[split] = []

    try:
        for docs in read_document_batches(piece, settings.read, stats):
            if settings.val_fraction:
                for text in docs:
                    split = "val" if _in_validation(text, settings.val_fraction) else "train"
                    counts["val_documents"] += split == "val"
                    batches[split].append(text)
            else:
                batches["train"].extend(docs)
            for split in SPLITS:
                if len(batches[split]) >= DOCS_PER_BATCH:
                    flush(split)
        shards = []
        for split in SPLITS:
            flush(split)
            writers[split].write(packers[split].finish())
            shard = writers[split].close(padding=packers[split].padding)
            if shard:
                shards.append({"split": split, "path": f"{split}/{index:06d}.arrow", **shard})
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    padding = sum(p.padding for p in packers.values())
    return {
        "piece": index,
        "source": {"path": piece.file.path, "start": piece.start, "end": piece.end},
        "shards": shards,
        "stats": {**asdict(stats), **counts, "padding_tokens": padding, "sequences": sum(s["num_rows"] for s in shards)},
    }


def _in_validation(text: str, fraction: float) -> bool:
    """Deterministic split by document content: the same document lands in the same split anywhere."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


class _ShardWriter:
    """An Arrow IPC stream of fixed-length rows, written in fixed-size record batches."""

    def __init__(self, path: Path, seq_len: int, dtype):
        self.path, self.seq_len, self.dtype = path, seq_len, dtype
        self.schema = manifest.shard_schema(seq_len, dtype)
        self.value_type = self.schema.field("input_ids").type.value_type
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.rows = 0
        self.writer = None

    def write(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(rows)
            self.pending_rows += len(rows)
        while self.pending_rows >= ROWS_PER_RECORD_BATCH:
            block = np.concatenate(self.pending)
            self._emit(block[:ROWS_PER_RECORD_BATCH])
            rest = block[ROWS_PER_RECORD_BATCH:]
            self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def _emit(self, rows: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = atomic.temporary_name(self.path)
            self.sink = pa.OSFile(str(self.tmp), "wb")
            self.writer = pa.ipc.new_stream(self.sink, self.schema)
        # From the raw buffer: `pa.array(ndarray)` would import pandas (half a second per worker).
        flat = np.ascontiguousarray(rows).reshape(-1)
        values = pa.Array.from_buffers(self.value_type, len(flat), [None, pa.py_buffer(flat)])
        column = pa.FixedSizeListArray.from_arrays(values, self.seq_len)
        self.writer.write_batch(pa.record_batch([column], schema=self.schema))
        self.rows += len(rows)

    def abort(self) -> None:
        """Drop the unfinished file of a piece that failed."""
        if self.writer is not None:
            self.sink.close()
            self.tmp.unlink(missing_ok=True)
            self.writer = None

    def close(self, padding: int) -> dict | None:
        """Finish the file under its final name; None when the piece had no rows for it."""
        if self.pending_rows:
            self._emit(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        if self.writer is None:
            return None
        self.writer.close()
        self.sink.close()
        atomic.publish(self.tmp, self.path)
        return {
            "num_rows": self.rows,
            "num_tokens": self.rows * self.seq_len - padding,
            "bytes": self.path.stat().st_size,
            "sha256": manifest.file_sha256(self.path),
        }
