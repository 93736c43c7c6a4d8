"""Byte-level BPE and WordPiece tokenizers trained with the `tokenizers` library.

Laid out as the published models' tokenizers are, so that everything downstream treats an
`alum tokenizer --kind byte-level-bpe` directory like roberta-base's and a `--kind
wordpiece` one like bert-base-cased's:
- byte-level BPE: the GPT-2/RoBERTa byte alphabet, no prefix space, `<s> A </s>` framing
  and `<s> A </s></s> B </s>` pairs, `<mask>` absorbing the space before it (RoBERTa's
  lstrip), vocab.json + merges.txt + tokenizer.json;
- WordPiece: BERT's normaliser (cased: no lowercasing, accents kept) and pre-tokeniser,
  `[CLS] A [SEP]` framing with token types on pairs, vocab.txt + tokenizer.json.
The special tokens take ids 0-4 in the style's order. Training is deterministic for a
given sample (BPE merges break ties by token; the WordPiece vocabulary, whose trainer
numbers ties in hash order, is sorted), and the sample is the seeded, memory-bounded one
every kind uses.
"""

from __future__ import annotations

from data_prep.errors import UserError


def train_hf_tokenizer(sample: list[str], kind: str, vocab_size: int, special_tokens: dict[str, str]):
    """A `transformers` fast tokenizer of `kind` trained on `sample`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, RobertaTokenizerFast

    specials = list(special_tokens.values())
    if vocab_size <= len(specials):
        raise UserError(f"--vocab-size {vocab_size}: must exceed the {len(specials)} special tokens")
    cls, sep = special_tokens["cls"], special_tokens["sep"]
    if kind == "byte-level-bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token=special_tokens["unk"]))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(sample, trainer)
    if kind == "wordpiece":
        # The trainer numbers tokens of equal frequency in hash order, which differs from run
        # to run; WordPiece's greedy longest match does not use ids, so sorting changes nothing else.
        vocab = tokenizer.get_vocab()
        ordered = specials + sorted(set(vocab) - set(specials))
        tokenizer.model = models.WordPiece(
            {token: i for i, token in enumerate(ordered)}, unk_token=special_tokens["unk"]
        )
    ids = {token: tokenizer.token_to_id(token) for token in (cls, sep)}
    roles = {f"{role}_token": token for role, token in special_tokens.items()}
    if kind == "byte-level-bpe":
        tokenizer.post_processor = processors.RobertaProcessing(
            (sep, ids[sep]), (cls, ids[cls]), add_prefix_space=False
        )
        tokenizer.add_special_tokens(
            [AddedToken(special_tokens["mask"], lstrip=True, rstrip=False, normalized=False, special=True)]
        )
        return RobertaTokenizerFast(
            tokenizer_object=tokenizer, add_prefix_space=False, bos_token=cls, eos_token=sep, **roles
        )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=list(ids.items())
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=False, **roles)
