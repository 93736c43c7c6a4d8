"""`alum shard`: tokenize a corpus in parallel and write fixed-length Arrow shards.

The corpus is planned as small work units grouped into pieces of about `--piece-mb` of
input (`data_prep.work_units`). Worker processes tokenize units (any of them, so one large
file keeps every worker busy) and split them into train/validation by document hash; the
main process packs each piece's units in order and writes them as that piece's shard
files (`data_prep.shard_file`). A piece's bytes depend only on the piece, so they never
depend on `--workers`, and `--num-nodes N --node-rank R` simply gives node R the pieces i
with i % N == R.

Crash safety and resume: shard files are written under temporary names and renamed when
complete; then a small record of the piece (its shards, their sha256, counts) is written
to `.progress/`. A re-run skips pieces with records. When every piece has a record, the
node that notices writes `manifest.json` (see `data_prep.manifest`) and removes the
bookkeeping.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep import atomic, manifest, output_dir
from data_prep.corpus import Piece, ReadOptions
from data_prep.errors import UserError
from data_prep.inputs import expand_inputs
from data_prep.shard_file import GroupWriter
from data_prep.tokenizer_dir import TokenizerInfo, load_tokenizer
from data_prep.work_units import SPLITS, UnitTokens, plan_groups, tokenize_unit

COMMAND = "alum shard"
MIN_SEQ_LEN = 8
IN_FLIGHT_PER_WORKER = 4
PROGRESS_DIR = ".progress"
STATE_FILE = ".shard-state.json"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
LAYOUT = (manifest.MANIFEST, STATE_FILE, PROGRESS_DIR, *SPLITS)  # the top-level names a shard directory holds


@dataclass(frozen=True)
class ShardSettings:
    """Everything that determines the output bytes (workers and node count do not)."""

    seq_len: int
    val_fraction: float = 0.01
    piece_bytes: int = 64 << 20
    read: ReadOptions = ReadOptions()

    def check(self) -> None:
        if self.seq_len < MIN_SEQ_LEN:
            raise UserError(
                f"--seq-len {self.seq_len} is too small: rows need at least {MIN_SEQ_LEN} tokens ([CLS] and [SEP] "
                "take 2)"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.piece_bytes < 4096:
            raise UserError(f"--piece-mb: pieces must be at least 4 KiB, got {self.piece_bytes} bytes")


def shard_corpus(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
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
    output_dir.check_apart(
        out,
        [("--tokenizer", tokenizer_dir), *(("input", path) for path in inputs), *(("input", f.path) for f in files)],
    )
    groups = plan_groups(files, settings.read, settings.piece_bytes)
    identity = manifest.dataset_identity(settings, tokenizer, files, len(groups))

    if _already_complete(out, identity, overwrite):
        return {"out": str(out), "already_complete": True, **manifest.read(out)["stats"]}
    mine = [i for i in range(len(groups)) if i % num_nodes == node_rank]
    with stop_when_full(out):
        created = _prepare_output(out, identity, overwrite, set(mine))

        done = set(_finished_pieces(out))
        todo = [i for i in mine if i not in done]
        resumed = len(mine) - len(todo)
        if resumed:
            print(f"resuming: {resumed} of {len(mine)} pieces already done")
        try:
            stats = _run_groups(_Job(tokenizer, settings), out, groups, todo, workers)
        except UserError:
            if created:  # bad input: the inputs must change, so nothing here can be resumed
                shutil.rmtree(out, ignore_errors=True)
            raise

        summary = {"out": str(out), "pieces_done": len(todo), "pieces_resumed": resumed, **stats}
        records = _finished_pieces(out)
        if len(records) == len(groups):
            summary["manifest"] = str(finalize(out, created_out=created))
        else:
            summary["pieces_missing"] = len(groups) - len(records)
    summary["seconds"] = time.perf_counter() - started
    return summary


@contextlib.contextmanager
def stop_when_full(out: Path):
    """A full disk (or quota) while writing shards: one line, not a traceback. Nothing
    half-written stays behind (shard files and records are written under temporary names,
    removed when a write fails), and the pieces finished so far are kept: the same command,
    run again once there is space, continues from them."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        raise UserError(
            f"{out}: {os.strerror(e.errno)}; the shards finished so far are kept: "
            "free some space and run the same command again to continue"
        ) from None


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
    if missing and (out / manifest.MANIFEST).is_file():
        return out / manifest.MANIFEST  # another node finished at the same time and is tidying up
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise UserError(
            f"{out}: {len(missing)} of {identity['num_pieces']} pieces are not done yet ({shown}); run the remaining "
            "nodes"
        )
    data = manifest.build(identity, [records[i] for i in sorted(records)])
    if data["stats"]["documents"] == 0:
        _remove_outputs(out, created_out)
        raise UserError(
            f"{', '.join(f['path'] for f in identity['inputs'])}: no documents in the inputs (empty or whitespace only)"
        )
    with stop_when_full(out):
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
        raise UserError(
            f"{out}: already holds a different dataset "
            f"({manifest.describe_difference(existing['settings'], identity)}); use --overwrite to replace it"
        )
    return True


def _prepare_output(out: Path, identity: dict, overwrite: bool, mine: set[int]) -> bool:
    """Create or adopt the output directory; True when this run created it. Nodes may start
    on a shared directory at the same time: the state file is written first, and a directory
    holding only another node's temporary files is still new."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and any(not atomic.is_temporary(p) for p in out.iterdir()):
        state = out / STATE_FILE
        if overwrite:
            output_dir.check_replaceable(out, COMMAND)
            shutil.rmtree(out)
        elif not state.is_file():
            raise UserError(f"{out}: exists and is not a shard directory; choose an empty or new --out")
        elif manifest.load_json(state) != identity:
            raise UserError(
                f"{out}: holds a different unfinished dataset "
                f"({manifest.describe_difference(manifest.load_json(state), identity)}); use --overwrite to replace it"
            )
        else:
            _remove_temporaries(out, mine)
            (out / PROGRESS_DIR).mkdir(exist_ok=True)
            output_dir.mark(out, COMMAND, LAYOUT)  # again: one a version before the marker left unfinished has none
            return False
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / STATE_FILE, identity)
    output_dir.mark(out, COMMAND, LAYOUT)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    return created


def _remove_temporaries(out: Path, mine: set[int]) -> None:
    """Leftovers of this node's interrupted run: never complete, never used. Only files of
    its own pieces: other nodes may be writing theirs into the same directory right now."""
    for directory in (*SPLITS, PROGRESS_DIR):
        for path in (out / directory).glob(f"*{atomic.TMP_MARK}*"):
            digits = path.name.removeprefix("piece-")[:6]
            if digits.isdigit() and int(digits) in mine:
                path.unlink(missing_ok=True)


def _remove_outputs(out: Path, created_out: bool) -> None:
    for name in (*SPLITS, PROGRESS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / STATE_FILE).unlink(missing_ok=True)
    (out / output_dir.MARKER).unlink(missing_ok=True)
    if created_out and not any(out.iterdir()):
        out.rmdir()


def _finished_pieces(out: Path) -> dict[int, dict]:
    records = {}
    for path in sorted((out / PROGRESS_DIR).glob("piece-*.json")):
        record = manifest.load_json(path)
        if all(
            (out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["bytes"] for s in record["shards"]
        ):
            records[record["piece"]] = record
    return records


# ----------------------------------------------------------------------------- work


@dataclass(frozen=True)
class _Job:
    """What a worker needs to tokenize any unit (inherited by the forked workers)."""

    tokenizer: TokenizerInfo
    settings: ShardSettings


def _run_groups(job: _Job, out: Path, groups: list[list[Piece]], todo: list[int], workers: int) -> dict:
    """Tokenize the units of the groups in `todo` (in parallel), write each group's shard
    files in unit order and record it as it completes; returns the summed stats."""
    totals: collections.Counter = collections.Counter()
    tasks = [(g, u) for g in todo for u in range(len(groups[g]))]
    ids, dtype = job.tokenizer.special_token_ids, manifest.token_dtype(job.tokenizer.vocab_size)
    writer = None
    with _ProgressBar(len(tasks), len(todo)) as bar:
        try:
            for (g, u), tokens in zip(tasks, _tokenized(job, [groups[g][u] for g, u in tasks], workers)):
                if u == 0:
                    writer = GroupWriter(out, g, units=groups[g], seq_len=job.settings.seq_len, ids=ids, dtype=dtype)
                writer.add(tokens)
                bar.unit_done(tokens.stats)
                if u == len(groups[g]) - 1:
                    record = writer.close()
                    writer = None
                    atomic.write_json(out / PROGRESS_DIR / f"piece-{g:06d}.json", record)
                    totals.update(record["stats"])
                    bar.group_done()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    return {key: totals[key] for key in (*manifest.STAT_KEYS, "sequences")}


def _tokenized(job: _Job, units: list[Piece], workers: int):
    """The units' tokens in order: here, or by a pool of forked workers with at most a few
    units per worker in flight (the writer, not memory, sets the pace)."""
    if workers == 1 or len(units) <= 1:
        _worker_init(job)
        yield from map(_tokenize, units)
        return
    # fork: workers start in milliseconds and inherit the job (the tokenizer included).
    with multiprocessing.get_context("fork").Pool(
        min(workers, len(units)), initializer=_worker_init, initargs=(job,)
    ) as pool:
        pending: collections.deque = collections.deque()
        queued = iter(units)
        for unit in itertools.islice(queued, IN_FLIGHT_PER_WORKER * workers):
            pending.append(pool.apply_async(_tokenize, (unit,)))
        while pending:
            result = pending.popleft().get()
            for unit in itertools.islice(queued, 1):
                pending.append(pool.apply_async(_tokenize, (unit,)))
            yield result


_worker: dict = {}


def _worker_init(job: _Job) -> None:
    _worker.update(job=job, encode=job.tokenizer.encoder())


def _tokenize(unit: Piece) -> UnitTokens:
    job: _Job = _worker["job"]
    dtype = manifest.token_dtype(job.tokenizer.vocab_size)
    sep = job.tokenizer.special_token_ids["sep"]
    return tokenize_unit(
        unit,
        job.settings.read,
        val_fraction=job.settings.val_fraction,
        encode=_worker["encode"],
        sep_id=sep,
        dtype=dtype,
    )


class _ProgressBar:
    """Units tokenized, with shard groups written, documents, tokens and tokens/s."""

    def __init__(self, units: int, groups: int):
        self.bar = tqdm(total=units, desc="sharding", unit=" units", disable=None)
        self.groups, self.written = groups, 0
        self.started = time.perf_counter()
        self.documents = self.tokens = 0

    def unit_done(self, stats: dict) -> None:
        self.documents += stats["documents"]
        self.tokens += stats["tokens"]
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(
            shards=f"{self.written}/{self.groups}",
            docs=self.documents,
            tokens=self.tokens,
            tok_per_s=f"{rate:,.0f}",
            refresh=False,
        )
        self.bar.update(1)

    def group_done(self) -> None:
        self.written += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
