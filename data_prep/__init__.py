"""Corpus preparation: sentencepiece BPE tokenizers and fixed-length Arrow training shards."""
