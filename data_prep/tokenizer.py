"""`alum tokenizer`: train a tokenizer on a corpus sample; every kind loads with AutoTokenizer.

Three kinds (`--kind`):
- `bpe` (the default): sentencepiece BPE, below;
- `byte-level-bpe` (RoBERTa/GPT-2 style) and `wordpiece` (BERT style), trained with the
  `tokenizers` library (`data_prep.hf_training`) and written as Hugging Face tokenizer files.
All three train on the same sample (below) and are read back by `data_prep.tokenizer_dir`.

A sentencepiece tokenizer directory holds:
- `spm.model`: the sentencepiece model, used to tokenize training data;
- `tokenizer.json` + `tokenizer_config.json`: the same tokenizer for
  `transformers.AutoTokenizer.from_pretrained(DIR)`, built with the `tokenizers` library;
- `alum_tokenizer.json`: style, special tokens, the model's sha256 (the fingerprint that
  shard manifests and runs check) and the training settings;
- `.alum-output.json`: the marker by which `--overwrite` knows the directory as this
  command's own (`data_prep.output_dir`).

Training reads the corpus once as a stream and keeps a seeded reservoir sample of lines,
so memory is bounded by `sample_lines`, not by corpus size.

Parity between the two: sentencepiece is trained with `remove_extra_whitespaces=False`
(the Llama convention), which the `tokenizers` pipeline reproduces exactly on text without
leading whitespace, which is all training ever sees (`alum shard` strips documents): NFKC
charsmap, spaces to "▁", one "▁" before the text (only before the text, not after each
special token), byte fallback. Text that starts with a space gets "▁▁" from sentencepiece
and "▁" from the HF pipeline. The one deliberate difference: the special
tokens are control symbols that sentencepiece never produces from text (so a corpus cannot
inject [MASK] into training data), while the HF tokenizer maps their literal strings to
their ids (so `fill-mask` works with "[MASK]" in text).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from data_prep import atomic, output_dir
from data_prep.corpus import ReadOptions, ReadStats, plan_pieces, read_documents
from data_prep.errors import UserError
from data_prep.inputs import InputFile
from data_prep.tokenizer_dir import ALUM_META as META_FILE
from data_prep.tokenizer_dir import SENTENCEPIECE_MODEL as MODEL_FILE

COMMAND = "alum tokenizer"
KINDS = ("bpe", "byte-level-bpe", "wordpiece")
MAX_LINE_CHARS = 4096
META = "\u2581"  # sentencepiece's word-boundary marker "▁"

# Role -> token, in id order (the order fixes the ids 0..4).
SPECIAL_TOKENS = {
    "bert": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "roberta": {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"},
}


def train_tokenizer(
    files: list[InputFile],
    options: ReadOptions,
    out: str | Path,
    *,
    vocab_size: int,
    kind: str = "bpe",
    style: str | None = None,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    seed: int = 0,
    threads: int | None = None,
    sample_lines: int = 1_000_000,
    overwrite: bool = False,
) -> dict:
    """Train a tokenizer of `kind` on a sample of the corpus and write a complete tokenizer directory."""
    out = Path(out)
    if kind not in KINDS:
        raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    style = style or ("roberta" if kind == "byte-level-bpe" else "bert")
    if style not in SPECIAL_TOKENS:
        raise UserError(f"--style: expected one of {', '.join(SPECIAL_TOKENS)}, got {style!r}")
    output_dir.check_out(out, COMMAND, [("input", f.path) for f in files], overwrite)
    started = time.perf_counter()
    sample, stats, lines_seen = reservoir_sample(files, options, sample_lines, seed)
    if not sample:
        raise UserError(f"{' '.join(f.path for f in files)}: the corpus holds no text")
    settings = {
        "kind": kind,
        "vocab_size": vocab_size,
        "style": style,
        "character_coverage": character_coverage,
        "byte_fallback": byte_fallback,
        "seed": seed,
        "sample_lines": sample_lines,
    }
    if kind != "bpe":
        del settings["character_coverage"], settings["byte_fallback"]  # sentencepiece's alone
    if kind == "bpe":
        model = _train_model(
            sample,
            vocab_size=vocab_size,
            style=style,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            seed=seed,
            threads=threads or os.cpu_count() or 1,
        )
        write = functools.partial(_write_sentencepiece, model=model, style=style, settings=settings)
    else:
        from data_prep.hf_training import train_hf_tokenizer

        tokenizer = train_hf_tokenizer(sample, kind, vocab_size, SPECIAL_TOKENS[style])
        write = functools.partial(_write_hf, tokenizer=tokenizer, settings=settings)
    with atomic.directory(out, replace=overwrite) as tmp:
        written = write(tmp)
        output_dir.mark(tmp, COMMAND, os.listdir(tmp))
    return {
        "out": str(out),
        "documents": stats.documents,
        "lines_seen": lines_seen,
        "lines_sampled": len(sample),
        "kind": kind,
        "vocab_size": written,
        "seconds": time.perf_counter() - started,
    }


def reservoir_sample(files: list[InputFile], options: ReadOptions, k: int, seed: int):
    """A uniform, seeded sample of k lines from a single pass over the corpus (Algorithm R)."""
    rng = random.Random(seed)
    sample: list[str] = []
    stats = ReadStats()
    seen = 0
    docs = (doc for piece in plan_pieces(files, options, None) for doc in read_documents(piece, options, stats))
    for doc in tqdm(docs, desc="sampling", unit=" docs", disable=None):
        for line in doc.split("\n"):
            for start in range(0, len(line), MAX_LINE_CHARS):
                chunk = line[start : start + MAX_LINE_CHARS].strip()
                if not chunk:
                    continue
                if len(sample) < k:
                    sample.append(chunk)
                else:
                    j = rng.randrange(seen + 1)
                    if j < k:
                        sample[j] = chunk
                seen += 1
    return sample, stats, seen


def _train_model(sample, *, vocab_size, style, character_coverage, byte_fallback, seed, threads) -> bytes:
    ids = {role: i for i, role in enumerate(SPECIAL_TOKENS[style])}
    tokens = SPECIAL_TOKENS[style]
    spm.set_random_generator_seed(seed)
    model = tempfile.SpooledTemporaryFile()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            num_threads=threads,
            remove_extra_whitespaces=False,
            max_sentence_length=4 * MAX_LINE_CHARS,
            pad_id=ids["pad"],
            unk_id=ids["unk"],
            bos_id=ids["cls"],
            eos_id=ids["sep"],
            pad_piece=tokens["pad"],
            unk_piece=tokens["unk"],
            bos_piece=tokens["cls"],
            eos_piece=tokens["sep"],
            control_symbols=[tokens["mask"]],
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(_explain_training_error(str(e), vocab_size)) from None
    model.seek(0)
    return model.read()


def _explain_training_error(message: str, vocab_size: int) -> str:
    message = re.sub(r"^Internal: \S+ \[[^\]]*\]\s*", "", message.strip())
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (
            f"--vocab-size {vocab_size} is too large for this corpus: "
            f"at most {too_high.group(2)} pieces can be learned from it"
        )
    return f"--vocab-size {vocab_size}: sentencepiece could not train: {message}"


def _write_sentencepiece(tmp: Path, model: bytes, style: str, settings: dict) -> int:
    from sentencepiece import sentencepiece_model_pb2

    (tmp / MODEL_FILE).write_bytes(model)
    hf_tokenizer(model, style).save_pretrained(str(tmp))
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    meta = {
        "style": style,
        "vocab_size": len(proto.pieces),
        "sha256": hashlib.sha256(model).hexdigest(),
        "special_tokens": SPECIAL_TOKENS[style],
        "special_token_ids": {role: i for i, role in enumerate(SPECIAL_TOKENS[style])},
        "training": settings,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return len(proto.pieces)


def _write_hf(tmp: Path, tokenizer, settings: dict) -> int:
    """The Hugging Face files (tokenizer.json and the vocabulary files of the kind, as
    published models ship them) and the training settings, for the record."""
    tokenizer.save_pretrained(str(tmp))
    tokenizer.backend_tokenizer.model.save(str(tmp))
    (tmp / "alum_training.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return len(tokenizer)


def hf_tokenizer(model: bytes, style: str):
    """The `transformers` fast tokenizer equivalent to a sentencepiece BPE model."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    bpe = models.BPE(
        vocab=vocab,
        merges=_merges(proto, vocab),
        unk_token=proto.trainer_spec.unk_piece,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    tok = Tokenizer(bpe)
    steps = [normalizers.Replace(" ", META)]
    if proto.normalizer_spec.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    tok.normalizer = normalizers.Sequence(steps)
    # "first": the "▁" sentencepiece puts before the text goes before the text only, not
    # before every stretch of text between special tokens ("[MASK];" must give ";", not "▁;").
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokens = SPECIAL_TOKENS[style]
    # The mask stands for a whole piece with its leading "▁": it absorbs the space before it,
    # and the text after it keeps its own, so "a [MASK] b" and "a [MASK]; b" read like
    # training data ("▁a", mask, "▁b" and "▁a", mask, ";", "▁b").
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True, lstrip=(role == "mask"), rstrip=False)
            for role, t in tokens.items()
        ]
    )
    cls, sep = tokens["cls"], tokens["sep"]
    pair = f"{cls} $A {sep} $B:1 {sep}:1" if style == "bert" else f"{cls} $A {sep} {sep} $B {sep}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair, special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
    )
    roles = {f"{role}_token": token for role, token in tokens.items()}
    if style == "roberta":
        roles.update(bos_token=cls, eos_token=sep)
        input_names = ["input_ids", "attention_mask"]
    else:
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=input_names, **roles)


def _merges(proto, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: a piece's id is its merge priority."""
    merges = []
    for piece_id, p in enumerate(proto.pieces):
        if p.type != p.NORMAL:
            continue
        piece = p.piece
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, piece_id) for left, right in splits)
    merges.sort(key=lambda m: m[2])
    return [(left, right) for left, right, _ in merges]
