"""`alum finetune`'s study outputs: `--train-subset` (a fixed sample that no fine-tuning seed changes, and the
steps an epoch of it takes) and the per-example predictions in result.json (in the data's order, agreeing with
the reported accuracies to the example), run for real with the small model on a few SST-2 sentences."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import data_file

from data_prep.errors import UserError
from pipeline.data.glue import Example, Task, load_task, train_subset
from pipeline.tasks import finetune


@pytest.fixture(scope="module")
def sst2_small(tmp_path_factory) -> Path:
    """A GLUE SST-2 directory of 48 training and 16 dev sentences of SST-2's dev set, so --advglue applies."""
    source = data_file("sst2/dev.tsv").read_text().splitlines()
    out = tmp_path_factory.mktemp("sst2")
    (out / "train.tsv").write_text("\n".join(source[:49]) + "\n")  # the header and 48 rows
    (out / "dev.tsv").write_text("\n".join([source[0], *source[49:65]]) + "\n")
    return out


def options(model: Path, data: Path, out: Path, **changes) -> list[str]:
    chosen = {
        "--model": model,
        "--task": "sst2",
        "--data": data,
        "--out": out,
        "--seeds": "1",
        "--epochs": 2,
        "--batch-size": 8,
        "--eval-every": 3,
        **changes,
    }
    return [str(item) for pair in chosen.items() for item in pair]


def test_the_subset_is_a_fixed_sample_in_the_training_sets_order():
    train = [Example(f"sentence {i}", None, i % 2) for i in range(100)]
    task = Task("toy", ("0", "1"), train, train[:3], None)
    subset = train_subset(task, 30).train
    assert len(subset) == 30 and len(set(subset)) == 30
    assert [int(e.text.split()[1]) for e in subset] == sorted(int(e.text.split()[1]) for e in subset)
    assert train_subset(task, 30).train == subset  # no state carried between calls: the same sample each time
    assert train_subset(task, 10).train != train[:10]  # a sample, not the head of the file
    assert train_subset(task, 0) is task and train_subset(task, 100).train == train
    with pytest.raises(UserError, match=r"^--train-subset 101: the training set has only 100 examples$"):
        train_subset(task, 101)
    # The sample depends on the training set's size, not on its contents: a relabelled copy picks the same rows.
    relabelled = replace(task, train=[replace(e, label=1 - e.label) for e in train])
    assert [e.text for e in train_subset(relabelled, 30).train] == [e.text for e in subset]


def test_every_seed_and_every_invocation_trains_on_the_same_subset(
    small_model, sst2_small, tmp_path, monkeypatch, capsys
):
    seen = []
    original = finetune.finetune_seed

    def recording(args, task, seed):
        seen.append((seed, task.train))
        return original(args, task, seed)

    monkeypatch.setattr(finetune, "finetune_seed", recording)
    assert (
        finetune.main(options(small_model, sst2_small, tmp_path / "a", **{"--seeds": "1,2", "--train-subset": 20})) == 0
    )
    assert (
        finetune.main(options(small_model, sst2_small, tmp_path / "b", **{"--seeds": "7", "--train-subset": 20})) == 0
    )
    expected = train_subset(load_task("sst2", sst2_small), 20).train
    assert [seed for seed, _ in seen] == [1, 2, 7]
    assert all(train == expected for _, train in seen) and len(expected) == 20
    summary = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (summary["train_subset"], summary["train_examples"]) == (20, 20)
    # 2 epochs of ceil(20 / 8) = 3 steps; the whole training set (48) would take 2 x 6.
    assert [(s["steps"], [h["step"] for h in s["history"]]) for s in summary["seeds"]] == [(6, [3, 6])] * 2


def test_predictions_are_the_final_models_and_give_the_reported_accuracies(small_model, sst2_small, tmp_path):
    advglue = data_file("advglue/dev.json")
    assert finetune.main(options(small_model, sst2_small, tmp_path, **{"--advglue": advglue})) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    (seed,) = summary["seeds"]
    assert seed == json.loads((tmp_path / "seed-1" / "result.json").read_text())
    assert (summary["train_subset"], summary["train_examples"], seed["steps"]) == (0, 48, 12)
    task = load_task("sst2", sst2_small, advglue)
    for split, examples in (("dev", task.dev), ("advglue", task.adversarial)):
        predicted = seed["predictions"][split]
        assert len(predicted) == len(examples) and set(predicted) <= {"0", "1"}
        correct = sum(p == str(e.label) for p, e in zip(predicted, examples))
        assert correct / len(examples) == seed[f"{split}_accuracy"]  # exactly: the same pass, the same division
    assert len(seed["predictions"]["advglue"]) == 148
    assert seed["history"][-1]["dev_accuracy"] == seed["dev_accuracy"]
    # The saved model predicts the same labels: they are the final model's.
    model, tokenizer = finetune.load_model(tmp_path / "seed-1", 2, seed=0)
    ids, _ = finetune.encode(tokenizer, task.dev, 128)
    assert (
        finetune.label_digits(finetune.predict(model, ids, pad_id=tokenizer.pad_token_id), 2)
        == (seed["predictions"]["dev"])
    )


def test_more_than_ten_labels_are_listed_not_joined():
    assert finetune.label_digits(torch.tensor([0, 1, 1, 0]), 2) == "0110"
    assert finetune.label_digits(torch.tensor([3, 11, 0]), 12) == [3, 11, 0]


@pytest.mark.parametrize(
    "value, message",
    [
        ("-1", "--train-subset: must not be negative, got -1"),
        ("49", "--train-subset 49: the training set has only 48 examples"),
    ],
)
def test_bad_subset_sizes_are_refused_in_one_line(small_model, sst2_small, tmp_path, capsys, value, message):
    code = finetune.main(options(small_model, sst2_small, tmp_path / "out", **{"--train-subset": value}))
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"finetune: error: {message}"]
    assert not (tmp_path / "out").exists()
