"""What a run trains and validates on: one shard directory (`data.shards`) or a weighted
mixture of several (`data.sources`, `pipeline.data.mixture`), and the named sets it
validates on (each source's val split, and `eval.sets`, validated on but not trained on).

Everything is opened and checked here, before the model is built: every shard directory
must be made with `data.tokenizer` (by fingerprint) and share the training rows' seq_len, a
source must have rows, and a set to validate on must have its split; each is refused in one
line naming the source or set. Per-source figures are logged under the source's name:
`data/<name>/consumed_samples` and `data/<name>/epoch` (its own epochs: a small source with
a large weight repeats), and `eval/<name>/loss`, `ppl`, `accuracy`, ... from one
`pipeline.train.validation.Evaluator` per set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from data_prep.errors import UserError
from pipeline.data.batches import ShardDataset
from pipeline.data.mixture import Mixture
from pipeline.train.validation import Evaluator

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.train.config import RunConfig


@dataclass
class TrainingData:
    train: ShardDataset | Mixture  # what Batches reads
    source_names: list[str]  # a mixture's sources, in order; empty for data.shards
    val_sets: dict[str, ShardDataset]  # by name; "" is data.shards' own val split (logged as eval/...)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len

    def record(self, consumed_samples: int, seed: int) -> dict:
        """data/<name>/consumed_samples and data/<name>/epoch of each source, once ``consumed_samples`` are."""
        if not self.source_names:
            return {}
        order = self.train.order
        consumed = order.consumed(consumed_samples, seed)
        record = {}
        for name, count, size in zip(self.source_names, consumed.tolist(), order.sizes):
            record[f"data/{name}/consumed_samples"] = count
            record[f"data/{name}/epoch"] = count // size
        return record


def open_training_data(config: RunConfig, tokenizer, rank: int, world_size: int) -> TrainingData:
    """The run's datasets, checked (fingerprints, seq_len, splits, this rank's share of the
    shard checksums). ``config``: the RunConfig; ``tokenizer``: data.tokenizer's TokenizerInfo."""
    data, validating = config.data, config.eval.every_steps > 0
    if data.sources:
        named = [(f"data.sources {s.name} ({s.shards})", s.name, s.shards) for s in data.sources]
    else:
        named = [(data.shards, "", data.shards)]
    sources = [_open(where, shards, data.train_split, tokenizer, data.tokenizer) for where, _, shards in named]
    seq_len = sources[0].seq_len
    for (where, _, _), source in zip(named, sources):
        _check_seq_len(where, source, seq_len, named[0][0])
        if data.sources and len(source) == 0:
            raise UserError(f"{where}: its {data.train_split!r} split has no rows to train on")
        source.verify_checksums(rank, world_size)
    val_sets = {}
    if validating:
        for (where, name, shards), source in zip(named, sources):
            if data.val_split not in source.manifest["splits"]:
                raise UserError(
                    f"{where}: no {data.val_split!r} split to validate on (splits: "
                    f"{', '.join(source.manifest['splits'])}); shard with `alum shard --val-fraction 0.01`, "
                    "or set eval.every_steps=0 to train without validation"
                )
            val_sets[name] = ShardDataset(shards, data.val_split)
        for s in config.eval.sets:
            where = f"eval.sets {s.name} ({s.shards})"
            val_sets[s.name] = _open(where, s.shards, s.split, tokenizer, data.tokenizer)
            _check_seq_len(where, val_sets[s.name], seq_len, named[0][0])
    train = Mixture(sources, [s.weight for s in data.sources]) if data.sources else sources[0]
    return TrainingData(train, [s.name for s in data.sources], val_sets)


def _open(where: str, shards: str, split: str, tokenizer, tokenizer_dir: str) -> ShardDataset:
    """A split of a shard directory made with ``tokenizer``; ``where`` names it in errors."""
    try:
        dataset = ShardDataset(shards, split)
    except UserError as e:  # its message names the directory; a source's name goes in front
        if where == shards:
            raise
        raise UserError(f"{where.split(' (')[0]}: {e}") from None
    fingerprint = dataset.manifest["tokenizer"]["sha256"]
    if fingerprint != tokenizer.sha256:
        raise UserError(
            f"{where}: shards were built with another tokenizer (sha256 {fingerprint[:12]}) "
            f"than data.tokenizer {tokenizer_dir} ({tokenizer.sha256[:12]})"
        )
    return dataset


def _check_seq_len(where: str, dataset: ShardDataset, seq_len: int, first: str) -> None:
    if dataset.seq_len != seq_len:
        raise UserError(f"{where}: seq_len {dataset.seq_len}, but {first} has {seq_len}: every source must agree")


class Evaluators:
    """Validation of every named set on eval.every_steps: one Evaluator each, its keys
    prefixed by the set's name (eval/<name>/loss); data.shards' own val split keeps eval/loss."""

    def __init__(self, engine: DeepSpeedEngine, val_sets: dict[str, ShardDataset], config: RunConfig, vocab):
        self.every = config.eval.every_steps
        self.evaluators = {name: Evaluator(engine, dataset, config, vocab) for name, dataset in val_sets.items()}

    def due(self, step: int) -> bool:
        return bool(self.evaluators) and step % self.every == 0

    def __call__(self) -> dict:
        record = {}
        for name, evaluator in self.evaluators.items():
            prefix = f"eval/{name}/" if name else "eval/"
            record.update({prefix + key.removeprefix("eval/"): value for key, value in evaluator().items()})
        return record
