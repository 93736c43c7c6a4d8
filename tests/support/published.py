"""Stand-ins for published checkpoints, laid out as roberta-base and bert-base-cased are.

Nothing can be downloaded here, so the tests make small ones the way the originals were
made, with the `tokenizers` library and `save_pretrained`, independently of `alum tokenizer`:

- RoBERTa: a byte-level BPE trained on the text, saved as vocab.json + merges.txt +
  tokenizer.json (no tokenizer_config.json: AutoTokenizer finds the class through
  config.json's model_type), and a RobertaForMaskedLM in model.safetensors;
- BERT: a cased WordPiece vocab.txt with a tokenizer_config.json and no tokenizer.json (the
  fast tokenizer is converted from the vocabulary on load), and a BertForMaskedLM.

    python tests/support/published.py roberta|bert TEXT_FILE OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

VOCAB = 2000
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def lines(text_file: Path) -> list[str]:
    return [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_roberta(text_file: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    out.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines(text_file), vocab_size=VOCAB, special_tokens=ROBERTA_SPECIALS, show_progress=False)
    bpe.save_model(str(out))  # vocab.json + merges.txt
    tokenizer = RobertaTokenizerFast(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (out / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64 + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        **SIZE,
    )
    RobertaForMaskedLM(config).save_pretrained(str(out))
    return out


def make_bert(text_file: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM

    out.mkdir(parents=True)
    wordpiece = BertWordPieceTokenizer(lowercase=False, strip_accents=False)
    wordpiece.train_from_iterator(lines(text_file), vocab_size=VOCAB, special_tokens=BERT_SPECIALS, show_progress=False)
    wordpiece.save_model(str(out))  # vocab.txt
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "model_max_length": 64}) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), max_position_embeddings=64, pad_token_id=0, **SIZE)
    BertForMaskedLM(config).save_pretrained(str(out))
    return out


if __name__ == "__main__":
    kind, text, target = sys.argv[1:4]
    print({"roberta": make_roberta, "bert": make_bert}[kind](Path(text), Path(target)))
