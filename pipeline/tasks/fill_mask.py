"""Fill-mask on held-out rows: what a trained masked LM guesses for a word, shown as text.

A model that has learned only token frequencies guesses the same few words everywhere; one
that uses the context guesses differently in each sentence. The words are chosen by a fixed
rule, not by how well the model does: in each of the first val rows, the first whole word
(a piece that starts a word, of at least MIN_LETTERS letters, followed by the start of
another word or by punctuation) with CONTEXT ordinary pieces on either side. The model sees
the whole row, as in training, with that one piece masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.batches import ShardDataset

CONTEXT = 8
MIN_LETTERS = 4
WORD_START = "▁"  # how sentencepiece (and the HF tokenizer `alum tokenizer` writes) marks a word's first piece


@dataclass(frozen=True)
class Guess:
    row: int  # in the val split
    position: int  # of the masked piece in the row
    text: str  # the context around the masked word, with the tokenizer's mask token in its place
    truth: str
    guesses: tuple[str, ...]  # the model's top guesses, best first


def fill_mask_examples(model_dir: str | Path, shards: str | Path, rows: int = 3, top: int = 3) -> list[Guess]:
    """Guesses of the HF masked LM in `model_dir` (with its tokenizer files, as `alum export`
    writes them) for one word in each of the first `rows` rows of the val split that have one."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    dataset = ShardDataset(shards, "val")
    examples = []
    for index in range(len(dataset)):  # row by row: a val split can be millions of rows
        row = dataset.rows(np.array([index]))[0]
        pieces = tokenizer.convert_ids_to_tokens(row.tolist())
        target = _target(pieces, set(tokenizer.all_special_ids), row)
        if target is None:
            continue
        masked = row.copy()
        masked[target] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(masked)[None],
                attention_mask=torch.from_numpy(row != tokenizer.pad_token_id)[None],
            ).logits
        best = logits[0, target].topk(top).indices.tolist()
        examples.append(
            Guess(
                index,
                target,
                _context(tokenizer, row, target),
                _word(pieces[target]),
                tuple(_word(p) for p in tokenizer.convert_ids_to_tokens(best)),
            )
        )
        if len(examples) == rows:
            break
    return examples


def _target(pieces: list[str], special_ids: set[int], row: np.ndarray) -> int | None:
    for i in range(CONTEXT, len(pieces) - CONTEXT):
        window = row[i - CONTEXT : i + CONTEXT + 1]
        word, following = pieces[i], pieces[i + 1]
        whole = following.startswith(WORD_START) or not following[:1].isalnum()
        if (
            word.startswith(WORD_START)
            and word[1:].isalpha()
            and len(word) > MIN_LETTERS
            and whole
            and not special_ids.intersection(window.tolist())
        ):
            return i
    return None


def _context(tokenizer, row: np.ndarray, target: int) -> str:
    before = tokenizer.decode(row[target - CONTEXT : target].tolist())
    after = tokenizer.decode(row[target + 1 : target + CONTEXT + 1].tolist())
    gap = " " if tokenizer.convert_ids_to_tokens(int(row[target + 1])).startswith(WORD_START) else ""
    return f"{before} {tokenizer.mask_token}{gap}{after}"


def _word(piece: str) -> str:
    return piece.removeprefix(WORD_START) or piece


def format_examples(examples: list[Guess]) -> list[str]:
    return [f'"... {e.text} ..."  ->  {", ".join(e.guesses)}   [{e.truth}]' for e in examples]
