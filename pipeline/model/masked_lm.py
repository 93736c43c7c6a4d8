"""The model: an HF BERT/RoBERTa masked LM, scored only where tokens were masked.

`build_model` makes the HF model from a model-size YAML (from scratch) or loads it from an
HF directory (`model.init_from`, continual pretraining), and checks it against the
tokenizer and sequence length. `MaskedLM` wraps it for training:

- the LM head (a hidden x vocab projection, the biggest matmul of a small model) runs only
  on the masked positions, in every pass, instead of on all B x T positions;
- `forward(..., delta)` adds an ALUM perturbation to the word embeddings or to the
  embedding output (`Perturbation`, shared with the fine-tuning classifier).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from data_prep.errors import UserError
from pipeline.model.perturbation import OnDetached

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ARCHS = ("bert", "roberta")


def model_classes(arch: str):
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    return {"bert": (BertConfig, BertForMaskedLM), "roberta": (RobertaConfig, RobertaForMaskedLM)}[arch]


def hf_config(source: str, vocab_size: int, special_ids: dict[str, int], seq_len: int):
    """The HF config of the model to train, checked against the tokenizer and the shards."""
    path = Path(source)
    if path.is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
    elif path.is_file():
        config = _config_from_yaml(path, vocab_size, special_ids)
    else:
        raise UserError(f"model.config: {source}: no such model-size YAML or HF model directory")
    if config.model_type not in ARCHS:
        raise UserError(f"{source}: model type {config.model_type!r} is not supported (bert or roberta)")
    if config.pad_token_id is not None and config.pad_token_id != special_ids["pad"]:
        # RoBERTa numbers positions from pad_token_id + 1; BERT's pad embedding is the tokenizer's pad.
        raise UserError(
            f"{source}: pad_token_id {config.pad_token_id} in its config, but the tokenizer's pad token is id "
            f"{special_ids['pad']}"
        )
    if config.vocab_size < vocab_size:
        raise UserError(f"{source}: model vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    positions = config.max_position_embeddings - (config.pad_token_id + 1 if config.model_type == "roberta" else 0)
    if seq_len > positions:
        raise UserError(
            f"{source}: shards have seq_len {seq_len} but the model has {positions} positions (max_position_embeddings)"
        )
    config._attn_implementation = "sdpa"
    return config


def _config_from_yaml(path: Path, vocab_size: int, special_ids: dict[str, int]):
    from pipeline.core.yaml_mapping import read_yaml_mapping

    spec = read_yaml_mapping(path, "model config keys")
    arch = spec.pop("arch", None)
    if arch not in ARCHS:
        raise UserError(f"{path}: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    config_class, _ = model_classes(arch)
    # HF configs keep unknown kwargs as attributes, so a typo (hidden_sise) would silently
    # train the default size: accept only the keys the config class itself has.
    unknown = sorted(set(spec) - set(config_class().to_dict()))
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown {arch} config key")
    # Round the vocabulary up to a multiple of 64 for tensor-core friendly shapes.
    spec.setdefault("vocab_size", -(-vocab_size // 64) * 64)
    spec.setdefault("pad_token_id", special_ids["pad"])
    if arch == "roberta":
        spec.setdefault("bos_token_id", special_ids["cls"])
        spec.setdefault("eos_token_id", special_ids["sep"])
    try:
        return config_class(**spec)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: not a valid {arch} config ({e})") from None


def local_device() -> torch.device:
    """Where a one-process run outside DeepSpeed (evaluation, plain fine-tuning) computes: the
    current GPU where there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_init_from(init_from: str) -> None:
    """A model directory to continue from has a config and weights (checked before any set-up)."""
    path = Path(init_from)
    if not (path / "config.json").is_file():
        raise UserError(f"model.init_from: {init_from}: not an HF model directory (no config.json)")
    if not any((path / name).is_file() for name in WEIGHTS):
        raise UserError(f"model.init_from: {init_from}: no weights ({' or '.join(WEIGHTS[::2])})")


def build_model(config: PretrainedConfig, init_from: str | None, activation_checkpointing: bool) -> nn.Module:
    """An HF masked LM: loaded from `init_from` (continual pretraining) or freshly initialised.
    Loaded in float32 whatever dtype the checkpoint was saved in: the engine keeps fp32
    master weights and casts for bf16/fp16 itself."""
    _, model_class = model_classes(config.model_type)
    if init_from:
        check_init_from(init_from)
        model = model_class.from_pretrained(
            init_from, config=config, attn_implementation="sdpa", dtype=torch.float32, local_files_only=True
        )
    else:
        model = model_class(config)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class Perturbation:
    """Adds a perturbation delta to the embeddings through a forward hook, and keeps the
    unperturbed tensor: on the word embeddings, or on the embedding layer's output (after its
    LayerNorm and dropout). A hook, rather than feeding cached embeddings to the encoder,
    keeps every pass running the whole model in the same order, which the dropout replay of
    `pipeline.methods.adversarial` relies on, and works through a DeepSpeed engine and through
    `engine.module` alike. A delta wrapped in `OnDetached` is added to a detached copy of the
    embeddings (``adversarial.embedding_grad: detached``)."""

    def __init__(self, base_model: nn.Module, perturb_at: str):
        embeddings = base_model.embeddings
        target = embeddings.word_embeddings if perturb_at == "word_embeddings" else embeddings
        target.register_forward_hook(self._add)
        self._delta: torch.Tensor | None = None
        self._embedded: torch.Tensor | None = None

    def _add(self, module, inputs, output):
        self._embedded = output
        if self._delta is None:
            return None
        delta, base = self._delta, output
        if isinstance(delta, OnDetached):
            delta, base = delta.delta, output.detach()
        delta = delta(output) if callable(delta) else delta
        return base + delta.to(output.dtype)

    def run(self, delta, fn):
        """(fn() computed with delta added, the unperturbed embeddings [B, T, H])."""
        self._delta = delta
        try:
            result = fn()
        finally:
            self._delta = None
        embedded, self._embedded = self._embedded, None
        return result, embedded


class MaskedLM(nn.Module):
    """A training view of an HF masked LM: masked-position logits, optional perturbation."""

    def __init__(self, hf_model: nn.Module, perturb_at: str = "embedding_output"):
        super().__init__()
        self.hf = hf_model
        self.perturbation = Perturbation(self.encoder(), perturb_at)

    def encoder(self) -> nn.Module:
        return getattr(self.hf, self.hf.base_model_prefix)

    def head(self) -> nn.Module:
        return self.hf.cls if hasattr(self.hf, "cls") else self.hf.lm_head

    def forward(self, input_ids, attention_mask, masked_index, delta=None):
        """(logits [N, V] at the masked tokens, the perturbable embeddings [B, T, H]).
        ``masked_index`` [N] holds the masked tokens' flat indices into B x T: gathering by
        index, unlike by a boolean mask, needs no host sync to learn N. ``attention_mask``
        None means no padding (`pipeline.data.batches.masked_batch` decides on the host): the encoder
        then builds no mask, where a mask of ones would cost a host sync per forward
        (transformers asks the device whether every token is real), and SDPA may use its
        flash kernel; the result is the same as with a mask of ones."""

        def hidden():
            return self.encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        states, embedded = self.perturbation.run(delta, hidden)
        return self.head()(states.flatten(0, 1).index_select(0, masked_index)), embedded
