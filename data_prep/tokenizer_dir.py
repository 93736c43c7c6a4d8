"""A tokenizer directory as sharding and training see it, whichever kind it is.

Two kinds are read:
- `sentencepiece`: written by `alum tokenizer --kind bpe` (spm.model + alum_tokenizer.json);
  shards are tokenized with sentencepiece itself;
- `hf`: any directory `transformers.AutoTokenizer` loads as a fast tokenizer, offline:
  tokenizer.json, vocab.json + merges.txt (RoBERTa, GPT-2), vocab.txt (BERT), as published or
  as `alum tokenizer --kind byte-level-bpe|wordpiece` writes them. Shards are tokenized with
  its `tokenizers` backend, without special tokens (the packer frames rows itself), and
  special tokens' literal strings in the corpus ("<mask>", "[SEP]") are encoded as text.

Either way a `TokenizerInfo` names the five roles masked-LM training needs (pad, unk, cls,
sep, mask: cls/sep fall back to bos/eos, so RoBERTa's `<s> ... </s>` frames rows) and a
fingerprint, the sha256 of the tokenizer's files, that shard manifests and runs compare.
A model directory that also holds config.json and weights is fingerprinted over its
tokenizer files only, so an exported model and its source tokenizer agree. The resolved
form of a Hugging Face tokenizer (roles, vocabulary size, backend) is cached under
~/.cache/alum/tokenizers by fingerprint and library versions: resolving it imports
transformers, which takes seconds, and every later shard or training run skips that.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import UserError

SENTENCEPIECE_MODEL = "spm.model"
ALUM_META = "alum_tokenizer.json"
# Files that can make up a Hugging Face tokenizer (what a run copies and export ships).
HF_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)
ROLES = ("pad", "unk", "cls", "sep", "mask")


@dataclass(frozen=True)
class TokenizerInfo:
    """What data preparation and training need to know about a tokenizer directory."""

    path: Path
    kind: str  # "sentencepiece" | "hf"
    sha256: str
    vocab_size: int
    style: str  # sentencepiece: bert | roberta; hf: the tokenizer class
    special_token_ids: dict[str, int]
    files: tuple[str, ...]  # the files that make the tokenizer, relative to path
    backend: str = ""  # hf: the `tokenizers` JSON, so workers build it without transformers

    def encoder(self):
        """A function from a list of texts to their token ids, without special tokens, on
        one thread (the shard workers are the parallelism)."""
        if self.kind == "sentencepiece":
            import sentencepiece as spm

            processor = spm.SentencePieceProcessor(model_file=str(self.path / SENTENCEPIECE_MODEL))
            return lambda texts: processor.encode(texts, num_threads=1)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.backend)
        backend.encode_special_tokens = True  # "<mask>" in a corpus is text, never the mask token
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def holds_tokenizer(directory: Path) -> bool:
    """Whether a directory (a model directory, say) has tokenizer files of either kind."""
    return any((Path(directory) / name).is_file() for name in (SENTENCEPIECE_MODEL, *HF_FILES))


def load_tokenizer(directory: str | Path) -> TokenizerInfo:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: tokenizer directory does not exist")
    if (directory / SENTENCEPIECE_MODEL).is_file():
        return _sentencepiece(directory)
    return _hugging_face(directory)


def _sentencepiece(directory: Path) -> TokenizerInfo:
    model = directory / SENTENCEPIECE_MODEL
    meta_path = directory / ALUM_META
    if not meta_path.is_file():
        raise UserError(f"{directory}: no {ALUM_META}; this directory was not written by `alum tokenizer`")
    meta = json.loads(meta_path.read_text())
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    if sha != meta["sha256"]:
        raise UserError(
            f"{model}: sha256 {sha[:12]} does not match {ALUM_META} ({meta['sha256'][:12]}); the model was altered"
        )
    files = tuple(name for name in (SENTENCEPIECE_MODEL, ALUM_META, *HF_FILES) if (directory / name).is_file())
    return TokenizerInfo(
        directory, "sentencepiece", sha, meta["vocab_size"], meta["style"], meta["special_token_ids"], files
    )


def _hugging_face(directory: Path) -> TokenizerInfo:
    files = tuple(name for name in HF_FILES if (directory / name).is_file())
    if not files:
        raise UserError(
            f"{directory}: not a tokenizer directory (no {SENTENCEPIECE_MODEL} from `alum tokenizer`, no Hugging Face "
            "tokenizer files: tokenizer.json, vocab.json + merges.txt or vocab.txt)"
        )
    sha = fingerprint(directory, files)
    cached = _cache_path(sha)
    if cached is not None and cached.is_file():
        meta = json.loads(cached.read_text())
        return TokenizerInfo(
            directory, "hf", sha, meta["vocab_size"], meta["style"], meta["special_token_ids"], files, meta["backend"]
        )
    tokenizer = _auto_tokenizer(directory)
    if not tokenizer.is_fast:
        raise UserError(
            f"{directory}: transformers loads only a slow tokenizer ({type(tokenizer).__name__}) from it; "
            "sharding needs a fast one (a tokenizer.json, or vocab files a fast tokenizer class reads)"
        )
    ids = _special_ids(directory, tokenizer)
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    info = TokenizerInfo(directory, "hf", sha, len(tokenizer), type(tokenizer).__name__, ids, files, backend.to_str())
    _store(cached, info)
    return info


def _cache_path(sha: str) -> Path | None:
    """Where the resolved form of a tokenizer is kept: importing transformers (and torch) to
    resolve it costs seconds, a real share of sharding a corpus of tens of MB. Keyed by the
    files' fingerprint and the library versions that resolve them."""
    try:
        from importlib.metadata import version

        key = hashlib.sha256(f"{sha} {version('transformers')} {version('tokenizers')}".encode()).hexdigest()[:32]
    except Exception:  # a library without metadata: resolve every time
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "alum" / "tokenizers" / f"{key}.json"


def _store(path: Path | None, info: TokenizerInfo) -> None:
    if path is None:
        return
    meta = {
        "vocab_size": info.vocab_size,
        "style": info.style,
        "special_token_ids": info.special_token_ids,
        "backend": info.backend,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: resolve again next time


def _auto_tokenizer(directory: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "you are using a model of type ..." and similar are not the user's problem here
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (
        Exception
    ) as e:  # transformers raises OSError, ValueError, KeyError, TypeError ... for unreadable directories
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{directory}: not a tokenizer directory transformers can load ({first})") from None
    finally:
        logging.set_verbosity(verbosity)


def _special_ids(directory: Path, tokenizer) -> dict[str, int]:
    ids = {
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        "cls": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
        "sep": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
        "mask": tokenizer.mask_token_id,
    }
    missing = [role for role in ROLES if ids[role] is None]
    if missing:
        raise UserError(
            f"{directory}: the tokenizer has no {' or '.join(missing)} token; masked-LM shards need "
            "pad, unk, cls (or bos), sep (or eos) and mask"
        )
    return ids


def fingerprint(directory: Path, files: tuple[str, ...]) -> str:
    """sha256 over the names and contents of a tokenizer's files."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256((directory / name).read_bytes()).digest())
    return digest.hexdigest()
