"""Model-size YAMLs and HF model directories as `hf_config` reads them: each shipped size
builds, and a model that does not fit the tokenizer or the shards is refused naming why."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO, raises_naming, write_yaml

from data_prep.errors import UserError
from pipeline.model.masked_lm import hf_config

MODEL_SIZES = sorted((REPO / "configs" / "models").glob("*.yaml"))
SPECIAL_IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


@pytest.mark.parametrize("path", MODEL_SIZES, ids=lambda p: p.name)
def test_every_model_size_builds_an_hf_config(path):
    spec = yaml.safe_load(path.read_text())
    assert "vocab_size" not in spec  # it comes from the tokenizer
    config = hf_config(str(path), vocab_size=8000, special_ids=SPECIAL_IDS, seq_len=128)
    assert config.model_type == spec["arch"]
    assert config.vocab_size == 8000  # already a multiple of 64
    assert config.pad_token_id == 0
    assert config.hidden_size == spec["hidden_size"]
    assert config.hidden_size % config.num_attention_heads == 0


def test_model_sizes_match_bert():
    base = hf_config("configs/models/bert-base.yaml", 8000, SPECIAL_IDS, 512)
    large = hf_config("configs/models/bert-large.yaml", 8000, SPECIAL_IDS, 512)

    def shape(c):
        return (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.max_position_embeddings,
        )

    assert shape(base) == (768, 12, 12, 3072, 512)
    assert shape(large) == (1024, 24, 16, 4096, 512)
    assert large.num_hidden_layers == 24


def test_vocab_is_rounded_up_to_64():
    config = hf_config("configs/models/tiny.yaml", vocab_size=8001, special_ids=SPECIAL_IDS, seq_len=128)
    assert config.vocab_size == 8064


def test_hf_config_refuses_a_vocab_smaller_than_the_tokenizers(tmp_path):
    path = write_yaml(
        tmp_path / "small.yaml", {"arch": "bert", "hidden_size": 32, "num_attention_heads": 2, "vocab_size": 100}
    )
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*vocab_size 100 is smaller"):
        hf_config(str(path), 8000, SPECIAL_IDS, 128)


def test_hf_config_refuses_a_seq_len_above_the_positions():
    path = "configs/models/bert-base.yaml"
    assert hf_config(path, 8000, SPECIAL_IDS, 512).max_position_embeddings == 512
    with pytest.raises(UserError, match=re.escape(path) + ".*max_position_embeddings"):
        hf_config(path, 8000, SPECIAL_IDS, 513)


def test_hf_config_counts_roberta_position_offset(tmp_path):
    """RoBERTa's position ids start after the padding id: 512 positions leave 512 - (pad + 1)."""
    path = write_yaml(
        tmp_path / "rob.yaml",
        {"arch": "roberta", "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 512},
    )
    roberta_ids = {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 4}
    config = hf_config(str(path), 8000, roberta_ids, 510)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 2, 1)
    with pytest.raises(UserError, match="max_position_embeddings"):
        hf_config(str(path), 8000, roberta_ids, 511)


def test_hf_config_reads_an_hf_model_directory(tmp_path):
    """Continual pretraining names an HF directory (config.json) as model.config."""
    from transformers import RobertaConfig

    RobertaConfig(
        vocab_size=8000, hidden_size=32, num_attention_heads=2, max_position_embeddings=514, pad_token_id=1
    ).save_pretrained(tmp_path)
    roberta_ids = {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": 4}
    config = hf_config(str(tmp_path), 8000, roberta_ids, 512)
    assert (config.model_type, config.vocab_size) == ("roberta", 8000)
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        hf_config(str(tmp_path), 8001, roberta_ids, 512)
    # RoBERTa numbers positions from its pad id: a tokenizer with another pad does not fit.
    with pytest.raises(
        UserError, match=re.escape(f"{tmp_path}: pad_token_id 1 in its config, but the tokenizer's pad token is id 0")
    ):
        hf_config(str(tmp_path), 8000, SPECIAL_IDS, 512)


def test_hf_config_refuses_an_unknown_arch(tmp_path):
    path = write_yaml(tmp_path / "gpt.yaml", {"arch": "gpt2", "hidden_size": 32})
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*arch must be one of bert, roberta, got 'gpt2'"):
        hf_config(str(path), 8000, SPECIAL_IDS, 128)


def test_hf_config_refuses_an_unknown_model_key(tmp_path):
    """HF configs would keep a typo as an attribute and silently train the default size."""
    path = write_yaml(tmp_path / "typo.yaml", {"arch": "bert", "hidden_sise": 32})
    with pytest.raises(UserError, match=re.escape(str(path)) + ": hidden_sise: unknown bert config key"):
        hf_config(str(path), 8000, SPECIAL_IDS, 128)


def test_hf_config_refuses_a_model_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- arch: bert\n")
    with pytest.raises(UserError, match=re.escape(str(path)) + ": expected a mapping"):
        hf_config(str(path), 8000, SPECIAL_IDS, 128)
    path.write_text("arch: [bert\n")
    with pytest.raises(UserError, match=re.escape(str(path)) + ": not valid YAML"):
        hf_config(str(path), 8000, SPECIAL_IDS, 128)


def test_hf_config_refuses_a_missing_source():
    with raises_naming("model.config: configs/models/nope.yaml"):
        hf_config("configs/models/nope.yaml", 8000, SPECIAL_IDS, 128)
