"""A small English corpus built from text every Python installation already has.

The demo must run on a fresh machine without downloads and without prose copied into this
repository, so it collects the docstrings of the Python standard library's source files
(read with `ast`, nothing is imported) into a JSON lines file, one docstring per document.
"""

from __future__ import annotations

import ast
import json
import sysconfig
import warnings
from pathlib import Path

from data_prep import atomic

MIN_CHARS = 80


def stdlib_docstrings(limit_bytes: int) -> list[str]:
    """Docstrings of the standard library, in a fixed file order, up to `limit_bytes` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        for doc in _docstrings(path):
            docs.append(doc)
            size += len(doc.encode())
            if size >= limit_bytes:
                return docs
    return docs


def _docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = (ast.get_docstring(n) for n in nodes)
    return [d for d in found if d and len(d) >= MIN_CHARS]


def write_corpus(path: Path, limit_bytes: int) -> dict:
    docs = stdlib_docstrings(limit_bytes)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    atomic.write_bytes(path, lines.encode())
    return {"path": str(path), "documents": len(docs), "bytes": len(lines)}
