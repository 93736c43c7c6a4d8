"""Shared fixtures: the real data in ../shared/data and a tokenizer trained on it once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ALUM_SHARED_DATA", REPO.parent / "shared" / "data"))


def data_file(relative: str) -> Path:
    """A file of ../shared/data; a missing one is a broken checkout, so fail rather than skip."""
    path = DATA / relative
    if not path.is_file():
        pytest.fail(f"{path}: shared test data is missing (set ALUM_SHARED_DATA to the shared/data directory)")
    return path


def run_alum(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the `alum` CLI in a fresh interpreter, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"alum {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def wikitext_train() -> Path:
    return data_file("wikitext-2/train.txt")


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return data_file("wikitext-2/valid.txt")


@pytest.fixture(scope="session")
def bert_tokenizer(tmp_path_factory, wikitext_train) -> Path:
    """A BERT-style BPE tokenizer trained on WikiText-2 train (shared by the data tests)."""
    from data_prep.corpus import ReadOptions, expand_inputs
    from data_prep.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizers") / "bert"
    train_tokenizer(expand_inputs([str(wikitext_train)]), ReadOptions(), out, vocab_size=2000, threads=2)
    return out
