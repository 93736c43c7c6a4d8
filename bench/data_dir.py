"""Where the benchmarks read real text: the directory ALUM_SHARED_DATA names, as the tests do."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    value = os.environ.get("ALUM_SHARED_DATA")
    if not value:
        raise SystemExit(
            "ALUM_SHARED_DATA is not set: set it to the test-data directory (wikitext-2/, sst2/, advglue/, ...)"
        )
    return Path(value)


def wikitext_train() -> Path:
    return data_dir() / "wikitext-2" / "train.txt"
