"""Classification data for `alum finetune`: GLUE SST-2 and RTE TSVs, AdvGLUE, or your own files.

- GLUE TSVs are split on tabs, never parsed with CSV quoting: RTE sentences contain `"`
  characters that a CSV reader would treat as quotes. The header names the columns.
- Label ids follow the GLUE convention that AdvGLUE's integer labels also use: SST-2
  0 = negative, 1 = positive; RTE 0 = entailment, 1 = not_entailment.
- A task directory of your own holds `train.jsonl` and `dev.jsonl` (objects with `text`,
  optionally `text_pair`, and `label`) or `train.tsv` and `dev.tsv` (header with `label` and
  `sentence`, or `sentence1` and `sentence2`). Its label set is the sorted set of the training
  labels (as strings), so ids are the same on every run.
- `train_subset` narrows the training set to a fixed sample of N examples drawn by a constant
  seed, never the fine-tuning seed: every seed and every model of a study trains on the same N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from data_prep.errors import UserError

SUBSET_SEED = 0  # the --train-subset sample's seed: a constant, so runs that differ in --seeds share the sample

# GLUE task -> (text columns, label names in id order, AdvGLUE subset)
GLUE = {
    "sst2": (("sentence",), ("0", "1"), "sst2"),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment"), "rte"),
}


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    train: list[Example]
    dev: list[Example]
    adversarial: list[Example] | None  # the matching AdvGLUE subset, when given


def load_task(task: str, data: str | Path | None, advglue: str | Path | None = None) -> Task:
    """sst2 or rte from a GLUE task directory (`data`), or a directory of your own (`task`)."""
    if task in GLUE:
        if data is None:
            raise UserError(
                f"--data: the GLUE {task} directory (with train.tsv and dev.tsv) is needed for --task {task}"
            )
        columns, labels, subset = GLUE[task]
        directory = _directory(Path(data), "--data")
        train = read_tsv(directory / "train.tsv", columns, labels)
        dev = read_tsv(directory / "dev.tsv", columns, labels)
        adversarial = read_advglue(Path(advglue), subset, columns, len(labels)) if advglue else None
        return Task(task, labels, train, dev, adversarial)
    if not Path(task).is_dir():
        raise UserError(
            f"--task: {task}: neither a task this command knows ({', '.join(GLUE)}) nor a directory of your own "
            "(train and dev .jsonl or .tsv)"
        )
    directory = Path(task)
    if advglue:
        raise UserError(f"--advglue: AdvGLUE has subsets for {', '.join(GLUE)} only, not for {task}")
    suffix = ".jsonl" if (directory / "train.jsonl").is_file() else ".tsv"
    train_path, dev_path = directory / f"train{suffix}", directory / f"dev{suffix}"
    if suffix == ".jsonl":
        raw_train, raw_dev = read_jsonl(train_path), read_jsonl(dev_path)
    else:
        raw_train, raw_dev = _own_tsv(train_path), _own_tsv(dev_path)
    labels = tuple(sorted({label for _, _, label, _ in raw_train}))
    return Task(
        directory.name, labels, _with_ids(raw_train, labels, train_path), _with_ids(raw_dev, labels, dev_path), None
    )


def train_subset(task: Task, size: int) -> Task:
    """`task` training on `size` of its training examples (0: all of them): the first `size` of a permutation
    drawn with numpy's default_rng(SUBSET_SEED), kept in the training set's own order. The sample depends on
    the training set and `size` alone, so every fine-tuning seed and every model sees the same examples."""
    if size == 0:
        return task
    if size > len(task.train):
        raise UserError(f"--train-subset {size}: the training set has only {len(task.train)} examples")
    chosen = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(task.train))[:size])
    return replace(task, train=[task.train[i] for i in chosen])


def read_tsv(path: Path, columns: tuple[str, ...], labels: tuple[str, ...]) -> list[Example]:
    """A GLUE TSV: tab-separated, a header line, string labels mapped to their index in `labels`."""
    rows = _tsv_rows(path, (*columns, "label"))
    return _with_ids([(r[0], r[1] if len(columns) > 1 else None, r[-1], where) for r, where in rows], labels, path)


def read_advglue(path: Path, subset: str, columns: tuple[str, ...], num_labels: int) -> list[Example]:
    """AdvGLUE's dev.json: {subset: [{sentence..., label: int}]}; labels are already ids."""
    if not path.is_file():
        raise UserError(f"{path}: no such AdvGLUE file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if subset not in data:
        raise UserError(f"{path}: no {subset!r} subset (has {', '.join(data)})")
    examples = []
    for i, row in enumerate(data[subset]):
        label = row.get("label")
        if not isinstance(label, int) or not 0 <= label < num_labels or any(c not in row for c in columns):
            raise UserError(
                f"{path}: {subset}[{i}]: needs {', '.join(columns)} and an integer label below {num_labels}"
            )
        examples.append(Example(row[columns[0]].strip(), row[columns[1]].strip() if len(columns) > 1 else None, label))
    return examples


def read_jsonl(path: Path) -> list[tuple[str, str | None, str, str]]:
    """(text, text_pair, label as a string, "file:line") per line of a JSON lines file."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where}: not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "label" not in record:
            raise UserError(f"{where}: needs a string 'text' and a 'label'")
        pair = record.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise UserError(f"{where}: 'text_pair' must be a string")
        rows.append((record["text"].strip(), pair.strip() if pair else None, str(record["label"]), where))
    return rows


def _own_tsv(path: Path) -> list[tuple[str, str | None, str, str]]:
    header = _header(path)
    columns = ("sentence1", "sentence2") if "sentence1" in header else ("sentence",)
    return [
        (r[0], r[1] if len(columns) > 1 else None, r[-1], where) for r, where in _tsv_rows(path, (*columns, "label"))
    ]


def _tsv_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[list[str], str]]:
    header = _header(path)
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} in the header ({', '.join(header)})")
    index = [header.index(c) for c in columns]
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)
        for number, line in enumerate(f, 2):
            if not line.strip():
                continue  # blank lines (a trailing one, say) hold no example
            fields = line.rstrip("\n").rstrip("\r").split("\t")
            if len(fields) < len(header):
                raise UserError(f"{path}:{number}: {len(fields)} tab-separated fields, the header has {len(header)}")
            rows.append(([fields[i].strip() for i in index], f"{path}:{number}"))
    return rows


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\n").rstrip("\r").split("\t")


def _with_ids(rows, labels: tuple[str, ...], source: Path) -> list[Example]:
    examples = []
    for text, pair, label, where in rows:
        if label not in labels:
            raise UserError(f"{where}: label {label!r} is not in the label set ({', '.join(labels)})")
        examples.append(Example(text, pair, labels.index(label)))
    if not examples:
        raise UserError(f"{source}: no examples")
    return examples


def _directory(path: Path, option: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{option}: {path}: no such directory")
    return path
