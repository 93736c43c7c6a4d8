"""`alum shard` end to end on WikiText-2: round trip, determinism, nodes, resume, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm
from helpers import REPO, refused_in_one_line, run_alum, shard_rows, tree_digest

from data_prep import manifest
from data_prep.corpus import ReadOptions, ReadStats, plan_pieces, read_documents
from data_prep.errors import UserError
from data_prep.inputs import expand_inputs
from data_prep.shard import ShardSettings, shard_corpus
from data_prep.tokenizer_dir import load_tokenizer
from data_prep.work_units import in_validation

SEQ_LEN = 64
PIECE_MB = "0.1"


def shard(out, inputs, tokenizer, *extra, check=True):
    return run_alum(
        "shard",
        "--input",
        *inputs,
        "--tokenizer",
        tokenizer,
        "--seq-len",
        SEQ_LEN,
        "--out",
        out,
        "--piece-mb",
        PIECE_MB,
        *extra,
        check=check,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, wikitext_valid, bert_tokenizer) -> Path:
    """A single-worker run: the bytes every other configuration must reproduce."""
    out = tmp_path_factory.mktemp("shards") / "reference"
    shard(out, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.1", "--workers", "1")
    return out


def test_rows_decode_back_to_the_documents(reference, wikitext_valid, bert_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(bert_tokenizer / "spm.model"))
    data = manifest.read(reference)
    cls, sep, pad = (data["special_token_ids"][k] for k in ("cls", "sep", "pad"))
    docs = [d for d in (line.strip() for line in wikitext_valid.read_text(encoding="utf-8").splitlines()) if d]
    for split in ("train", "val"):
        table = shard_rows(reference, split)
        assert table.shape[1] == SEQ_LEN and table.dtype == np.uint16
        assert (table[:, 0] == cls).all()
        # Each row is [CLS] content [SEP], then padding in the last row of a piece.
        content = []
        for row in table:
            body = row[1:][row[1:] != pad]
            assert body[-1] == sep
            content.append(body[:-1])
        stream = np.concatenate(content)
        assert stream[-1] == sep  # every document ends with the separator
        decoded = [sp.decode(part.tolist()) for part in np.split(stream[:-1], np.flatnonzero(stream[:-1] == sep))]
        decoded = [d.lstrip() if i else d for i, d in enumerate(decoded)]
        expected = [d for d in docs if (split == "val") == _is_val(d)]
        assert decoded == [sp.decode(sp.encode(d)) for d in expected]
        padded = (table == pad).any(axis=1).sum()
        assert padded <= len(manifest.read(reference)["splits"][split]["shards"])
    assert data["stats"]["val_documents"] == len([d for d in docs if _is_val(d)])
    assert 0.05 < data["stats"]["val_documents"] / data["stats"]["documents"] < 0.15


def _is_val(doc: str) -> bool:
    return in_validation(doc, 0.1)


def test_manifest_contract(reference, bert_tokenizer):
    data = manifest.read(reference)
    tok = load_tokenizer(bert_tokenizer)
    assert data["format_version"] == 1 and data["seq_len"] == SEQ_LEN and data["dtype"] == "uint16"
    assert data["tokenizer"] == {"sha256": tok.sha256, "kind": "sentencepiece", "vocab_size": 2000, "style": "bert"}
    assert data["special_token_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert set(data["splits"]) == {"train", "val"}
    assert (
        data["num_sequences"]
        == sum(s["num_sequences"] for s in data["splits"].values())
        == len(shard_rows(reference)) + len(shard_rows(reference, "val"))
    )
    assert data["num_tokens"] == data["num_sequences"] * SEQ_LEN - data["stats"]["padding_tokens"]
    for split in data["splits"].values():
        for entry in split["shards"]:
            assert entry["sha256"] == hashlib.sha256((reference / entry["path"]).read_bytes()).hexdigest()
    assert not (reference / ".progress").exists() and not (reference / ".shard-state.json").exists()
    assert manifest.verify(reference)["num_sequences"] == data["num_sequences"]


def test_shards_open_with_datasets(reference):
    import datasets

    data = manifest.read(reference)
    entry = data["splits"]["train"]["shards"][0]
    ds = datasets.Dataset.from_file(str(reference / entry["path"]))
    assert ds.num_rows == entry["num_rows"]
    assert ds.features["input_ids"].length == SEQ_LEN
    ds.set_format("numpy")
    np.testing.assert_array_equal(ds[:]["input_ids"], shard_rows(reference)[: entry["num_rows"]])


@pytest.mark.slow
def test_worker_count_does_not_change_the_bytes(tmp_path, reference, wikitext_valid, bert_tokenizer):
    out = tmp_path / "two-workers"
    shard(out, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.1", "--workers", "2")
    assert tree_digest(out) == tree_digest(reference)


@pytest.mark.slow
def test_node_partition_merges_to_the_single_machine_output(tmp_path, reference, wikitext_valid, bert_tokenizer):
    shared = tmp_path / "shared-fs"
    first = shard(
        shared, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.1", "--num-nodes", "2", "--node-rank", "1"
    )
    assert "this node's shards written" in first.stdout and not (shared / "manifest.json").exists()
    shard(shared, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.1", "--num-nodes", "2", "--node-rank", "0")
    assert tree_digest(shared) == tree_digest(reference)

    # Without a shared filesystem: each node writes its own directory, the copies are merged.
    for rank in (0, 1):
        shard(
            tmp_path / f"node{rank}",
            [wikitext_valid],
            bert_tokenizer,
            "--val-fraction",
            "0.1",
            "--num-nodes",
            "2",
            "--node-rank",
            str(rank),
        )
    merged = tmp_path / "merged"
    shutil.copytree(tmp_path / "node0", merged)
    early = run_alum("merge", merged)
    assert early.returncode == 2 and "pieces are not done yet" in early.stderr
    shutil.copytree(tmp_path / "node1", merged, dirs_exist_ok=True)
    run_alum("merge", merged, check=True)
    assert tree_digest(merged) == tree_digest(reference)


def shard_args(text: Path, tokenizer: Path, out: Path, piece_mb: str) -> list[str]:
    """`alum shard`'s arguments for `text` at SEQ_LEN with a 10% val split, in pieces of `piece_mb`."""
    return [
        "--input",
        str(text),
        "--tokenizer",
        str(tokenizer),
        "--seq-len",
        str(SEQ_LEN),
        "--out",
        str(out),
        "--piece-mb",
        piece_mb,
        "--val-fraction",
        "0.1",
    ]


def test_slurm_array_tasks_running_at_once_write_the_single_machine_output(
    tmp_path, reference, wikitext_valid, bert_tokenizer
):
    """launch/shard.sbatch as SLURM runs an array of two (--array=3-4): both tasks at once on one directory."""
    out = tmp_path / "shared-fs"
    args = ["bash", str(REPO / "launch" / "shard.sbatch"), *shard_args(wikitext_valid, bert_tokenizer, out, PIECE_MB)]
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_ARRAY_TASK_MIN": "3",
        "SLURM_ARRAY_TASK_MAX": "4",
        "SLURM_ARRAY_TASK_COUNT": "2",
    }
    tasks = [
        subprocess.Popen(
            args,
            env={**env, "SLURM_ARRAY_TASK_ID": task},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task in ("3", "4")
    ]
    results = [(task.wait(timeout=300), task.stderr.read()) for task in tasks]
    assert all(code == 0 for code, _ in results), results
    assert tree_digest(out) == tree_digest(reference)

    not_an_array = subprocess.run(
        args, env={k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")}, capture_output=True, text=True
    )
    assert not_an_array.returncode == 2
    assert (
        not_an_array.stderr
        == "shard.sbatch: not an array task; submit with sbatch --array=0-<N-1> launch/shard.sbatch ...\n"
    )


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_finished_pieces(tmp_path, reference, wikitext_valid, bert_tokenizer):
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "pipeline.cli", "shard", *shard_args(wikitext_valid, bert_tokenizer, out, "0.02")]
    # A finer piece size is a different dataset: compare against a clean run of the same settings.
    clean = tmp_path / "clean"
    subprocess.run(
        command[:-6] + ["--out", str(clean), "--piece-mb", "0.02", "--val-fraction", "0.1"],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while (
        len(list((out / ".progress").glob("piece-*.json"))) < 5
        and time.monotonic() < deadline
        and process.poll() is None
    ):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list((out / ".progress").glob("piece-*.json")))
    total = json.loads((out / ".shard-state.json").read_text())["num_pieces"]
    assert 5 <= done < total, "the run finished before it could be interrupted"
    assert not (out / "manifest.json").exists()

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert f"resuming: {done} of {total} pieces already done" in resumed.stdout
    assert tree_digest(out) == tree_digest(clean)
    again = run_alum(*command[3:], check=True)
    assert "already complete" in again.stdout


def test_a_full_disk_stops_in_one_line_and_the_same_command_continues_once_there_is_space(
    small_disk, tmp_path, reference, wikitext_valid, bert_tokenizer
):
    disk = small_disk.mount(256 << 10)  # the first pieces' shards fit (~150 KB), the third does not
    out = disk / "shards"
    full = shard(out, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.1", "--workers", "1", check=False)
    assert full.returncode == 2, full.stderr
    assert full.stderr.strip().splitlines() == [
        f"alum shard: error: {out}: No space left on device; the shards finished so far are kept: "
        "free some space and run the same command again to continue"
    ], full.stderr
    done = len(list((out / ".progress").glob("piece-*.json")))
    total = json.loads((out / ".shard-state.json").read_text())["num_pieces"]
    assert 0 < done < total
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no half-written shard or record

    small_disk.resize(4 << 20)
    resumed = shard(out, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.1", "--workers", "1")
    assert f"resuming: {done} of {total} pieces already done" in resumed.stdout
    assert tree_digest(out) == tree_digest(reference)


def test_verify_catches_truncated_and_altered_shards(tmp_path, reference):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    entry = manifest.read(copy)["splits"]["train"]["shards"][1]
    path = copy / entry["path"]
    original = path.read_bytes()

    path.write_bytes(original[:-100])
    result = run_alum("verify", copy)
    assert result.returncode == 2
    assert (
        f"{path}: {len(original) - 100} bytes, the manifest says {len(original)} (truncated or altered)"
        in result.stderr
    )

    altered = bytearray(original)
    altered[-200] ^= 0xFF
    path.write_bytes(bytes(altered))
    result = run_alum("verify", copy)
    assert result.returncode == 2 and f"{path}: sha256 does not match the manifest (altered)" in result.stderr

    path.write_bytes(original)
    assert run_alum("verify", copy).returncode == 0


def test_output_holding_a_different_dataset_is_refused(tmp_path, reference, wikitext_valid, bert_tokenizer):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    before = tree_digest(copy)
    result = shard(copy, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.2", check=False)
    assert result.returncode == 2
    assert (
        "already holds a different dataset (val_fraction 0.1 then, 0.2 now: --val-fraction); use --overwrite"
        in result.stderr
    )
    result = shard(copy, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.1", "--txt-docs", "blank", check=False)
    assert (
        "already holds a different dataset (read.txt_docs 'line' then, 'blank' now: --txt-docs); use --overwrite"
        in result.stderr
    )
    assert tree_digest(copy) == before
    shard(copy, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.2", "--overwrite")
    assert manifest.read(copy)["settings"]["val_fraction"] == 0.2

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    result = shard(foreign, [wikitext_valid], bert_tokenizer, "--overwrite", check=False)
    assert result.returncode == 2 and f"{foreign}: --overwrite replaces only what alum shard wrote" in result.stderr
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_overwrite_deletes_only_a_shard_directory_it_wrote(tmp_path, reference, wikitext_valid, bert_tokenizer):
    # A user's directory that happens to hold a manifest.json.
    home = tmp_path / "home"
    home.mkdir()
    (home / "manifest.json").write_text('{"mine": true}')
    (home / "thesis.tex").write_text("precious")
    before = tree_digest(home)
    refused_in_one_line(
        shard(home, [wikitext_valid], bert_tokenizer, "--overwrite", check=False),
        f"{home}: --overwrite replaces only what alum shard wrote, and it has no .alum-output.json",
    )
    # Its own output with a file of the user's added, and one written before the marker: refused as well.
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    (copy / "notes.txt").write_text("mine")
    refused_in_one_line(
        shard(copy, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.2", "--overwrite", check=False),
        f"{copy / 'notes.txt'}: not written by alum shard; --overwrite would delete it",
    )
    (copy / "notes.txt").unlink()
    (copy / ".alum-output.json").unlink()
    refused_in_one_line(
        shard(copy, [wikitext_valid], bert_tokenizer, "--val-fraction", "0.2", "--overwrite", check=False),
        "has no .alum-output.json",
    )
    # An --out inside an input or the tokenizer: refused before anything is written.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(wikitext_valid, corpus / "a.txt")
    refused_in_one_line(
        shard(corpus / "shards", [corpus], bert_tokenizer, check=False),
        f"--out {corpus / 'shards'}: lies inside the input {corpus}",
    )
    refused_in_one_line(
        shard(bert_tokenizer, [corpus], bert_tokenizer, "--overwrite", check=False),
        f"--out {bert_tokenizer}: is the --tokenizer",
    )
    assert (
        tree_digest(home) == before
        and [p.name for p in corpus.iterdir()] == ["a.txt"]
        and (bert_tokenizer / "spm.model").is_file()
    )
    assert manifest.read(copy)["settings"]["val_fraction"] == 0.1


def test_empty_corpus_leaves_nothing_behind(tmp_path, bert_tokenizer):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n   \n\n")
    out = tmp_path / "out"
    result = shard(out, [corpus], bert_tokenizer, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("no documents in the inputs (empty or whitespace only)")
    assert not out.exists()


def test_seq_len_too_small(tmp_path, wikitext_valid, bert_tokenizer):
    result = run_alum(
        "shard", "--input", wikitext_valid, "--tokenizer", bert_tokenizer, "--seq-len", "4", "--out", tmp_path / "o"
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == "alum shard: error: --seq-len 4 is too small: rows need at least 8 tokens ([CLS] and [SEP] take 2)\n"
    )
    assert not (tmp_path / "o").exists()


def test_bad_input_midway_leaves_no_partial_shards(tmp_path, bert_tokenizer):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(20000)) + "oops\n"
    )
    out = tmp_path / "out"
    with pytest.raises(UserError, match=rf"{corpus}:20001: not valid JSON"):
        shard_corpus([str(corpus)], bert_tokenizer, out, settings=ShardSettings(seq_len=SEQ_LEN, piece_bytes=1 << 20))
    assert not out.exists()


def test_large_vocabularies_use_int32():
    assert manifest.token_dtype(65536) == "uint16"
    assert manifest.token_dtype(65537) == "int32"
    assert manifest.shard_schema(16, "int32").field("input_ids").type == pa.list_(pa.int32(), 16)


def test_summary_reports_counts(tmp_path, wikitext_valid, bert_tokenizer):
    result = shard(tmp_path / "o", [wikitext_valid], bert_tokenizer)
    data = manifest.read(tmp_path / "o")
    table, counts = summary_table(result.stdout), data["stats"]
    assert {"seconds", "tokens_per_s"} <= set(table)
    shown = {
        key: f"{counts[key]:,}" for key in ("documents", "empty_documents", "val_documents", "replaced_characters")
    }
    assert {key: table[key] for key in shown} == shown
    assert table["sequences"] == f"{data['num_sequences']:,}" and table["tokens (documents)"] == f"{counts['tokens']:,}"
    assert table["tokens (rows, with [CLS]/[SEP] framing)"] == f"{data['num_tokens']:,}"
    assert table["padding_fraction"] == f"{counts['padding_tokens'] / (data['num_sequences'] * SEQ_LEN):.4f}"
    assert table["tokens_per_s"].replace(",", "").isdigit()  # a rate, shown whole (it was 844,343.18)
    stats = ReadStats()
    options = ReadOptions()
    docs = [
        d
        for p in plan_pieces(expand_inputs([str(wikitext_valid)]), options, None)
        for d in read_documents(p, options, stats)
    ]
    assert data["stats"]["documents"] == len(docs) == stats.documents
    assert data["stats"]["empty_documents"] == stats.empty_documents


def summary_table(stdout: str) -> dict[str, str]:
    """A summary `alum shard` or `alum verify` prints: its value by key, as shown."""
    return dict(re.fullmatch(r"  (\S.*?)  +(\S.*)", line).groups() for line in stdout.splitlines()[1:])


def test_shard_and_verify_token_counts_reconcile(tmp_path, wikitext_valid, bert_tokenizer):
    """`alum shard` prints the documents' tokens and the rows' (framing included); `alum verify` the rows'."""
    out = tmp_path / "s"
    printed = summary_table(shard(out, [wikitext_valid], bert_tokenizer).stdout)
    verified = summary_table(run_alum("verify", out, check=True).stdout)
    label = "tokens (rows, with [CLS]/[SEP] framing)"
    assert printed[label] == verified[label]
    data = manifest.read(out)
    documents, rows_tokens = (int(printed[key].replace(",", "")) for key in ("tokens (documents)", label))
    assert documents == data["stats"]["tokens"] and rows_tokens == data["num_tokens"] > documents


def test_a_truncated_gzip_input_ends_shard_and_tokenizer_in_one_line_leaving_nothing(tmp_path, bert_tokenizer):
    """The decompressor's EOFError was a 40-line traceback, exit 1, and left .shard-state.json behind."""
    from test_corpus import broken_compressed_files

    corpus = tmp_path / "truncated.txt.gz"
    corpus.write_bytes(broken_compressed_files(tmp_path)["truncated.txt.gz"])
    line = (
        f"{corpus}: not a valid gzip file: Compressed file ended before the end-of-stream marker was reached "
        "(reading from decompressed byte 0)"
    )
    shard = run_alum(
        "shard", "--input", corpus, "--tokenizer", bert_tokenizer, "--seq-len", SEQ_LEN, "--out", tmp_path / "shards"
    )
    assert (shard.returncode, shard.stderr.splitlines()) == (2, [f"alum shard: error: {line}"])
    assert not (tmp_path / "shards").exists()
    tokenizer = run_alum("tokenizer", "--input", corpus, "--vocab-size", 100, "--out", tmp_path / "tok")
    assert (tokenizer.returncode, tokenizer.stderr.splitlines()) == (2, [f"alum tokenizer: error: {line}"])
    assert not (tmp_path / "tok").exists()
