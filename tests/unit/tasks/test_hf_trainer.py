"""`pipeline.tasks.hf_trainer.AdversarialTrainer`: its loss is `compute_losses` on the Trainer's model,
the adversarial term starts at Trainer's step `start_step` and is logged, evaluation scores the
clean loss; and examples/hf_trainer_finetune.py fine-tunes an exported model where DeepSpeed is
not installed."""

from __future__ import annotations

import copy
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, data_file
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from pipeline.data.glue import read_tsv
from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.tasks.finetune import Classifier
from pipeline.tasks.hf_trainer import AdversarialTrainer

EXAMPLE = REPO / "examples" / "hf_trainer_finetune.py"
# A step 10 times the default: on this random model the term is then 4e-5 of a 0.69 loss, far above float32 round-off.
ALUM = {"method": "alum", "alpha": 1.0, "step_size": 1.0}


def dropout_free_classifier() -> BertForSequenceClassification:
    """Without dropout, so that a pass in train mode (as Trainer runs it) can be repeated by hand."""
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


@pytest.fixture
def batch() -> dict:
    ids = torch.randint(5, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0  # padding, which the perturbation's sizes must leave out
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def trainer_for(model, tmp_path, **adversarial) -> AdversarialTrainer:
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    return AdversarialTrainer(model=model, args=args, adversarial=AdversarialConfig(**adversarial))


def clean_loss(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )


def test_compute_loss_is_compute_losses_on_the_model(tmp_path, batch):
    model = dropout_free_classifier()
    by_hand = Classifier(copy.deepcopy(model))  # alum finetune's wrapper around the same weights
    trainer = trainer_for(model.train(), tmp_path, **ALUM)
    torch.manual_seed(3)  # the ALUM noise
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = compute_losses(
        lambda d: by_hand(ids, mask, d),
        lambda d: by_hand(ids, mask, d)[0],
        batch["labels"],
        config=AdversarialConfig(**ALUM),
        step=0,
        real_tokens=mask,
    )
    loss.backward()
    expected.loss.backward()
    assert loss.item() == expected.loss.item()
    assert torch.equal(model.classifier.weight.grad, by_hand.hf.classifier.weight.grad)
    assert expected.loss_adv.item() > 0
    assert loss.item() == pytest.approx(clean_loss(model, batch).item() + expected.loss_adv.item(), rel=1e-6)


def test_start_step_logging_and_evaluation(tmp_path, batch):
    model = dropout_free_classifier().train()
    trainer = trainer_for(model, tmp_path, **ALUM, start_step=2)
    ce = clean_loss(model, batch)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(
        ce.item(), rel=1e-6
    )  # Trainer's step 0 < start_step
    trainer.state.global_step = 2
    term = trainer.compute_loss(model, batch).item() - ce.item()
    assert term > 0
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["loss_adv"] == pytest.approx(term / 2, rel=1e-2)  # the mean over both batches
    model.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    assert outputs.logits.shape == (4, 2)


# Runs the example as where DeepSpeed is not installed: HF's Trainer (through accelerate)
# imports DeepSpeed whenever it can find it, so hiding it is how to show nothing needs it.
WITHOUT_DEEPSPEED = """
import importlib.machinery, runpy, sys

class WithoutDeepSpeed(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "deepspeed" else super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = WithoutDeepSpeed
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("deepspeed imported:", "deepspeed" in sys.modules)
"""


def write_jsonl(path, split: str, rows: int = 64):
    examples = read_tsv(data_file(f"sst2/{split}.tsv"), ("sentence",), ("0", "1"))[:rows]
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    return path


def run_example(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WITHOUT_DEEPSPEED, str(EXAMPLE), *map(str, args)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )


def test_the_example_fine_tunes_an_exported_model_without_deepspeed(small_model, tmp_path):
    out = tmp_path / "out"
    result = run_example(
        "--model",
        small_model,
        "--train",
        write_jsonl(tmp_path / "train.jsonl", "train"),
        "--dev",
        write_jsonl(tmp_path / "dev.jsonl", "dev"),
        "--method",
        "alum",
        "--out",
        out,
        "--max-steps",
        3,
        "--batch-size",
        16,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *_, last, imported = result.stdout.splitlines()
    assert last.startswith("dev accuracy: ") and 0 <= float(last.split(": ")[1]) <= 1
    assert imported == "deepspeed imported: False"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, ": no such file"),
        ('{"text": "fine"}\n', ":1: expected a JSON object with text and label"),
        ('{"text": "fine", "label": "pos"}\n', ":1: text must be a string and label an integer >= 0"),
    ],
)
def test_the_example_names_a_bad_data_file_in_one_line(tmp_path, capsys, content, message):
    read_rows = runpy.run_path(str(EXAMPLE))["read_rows"]
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        read_rows(str(path))
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"hf_trainer_finetune: error: {path}{message}"]


@pytest.mark.parametrize("method", ["alum_amortized", "freelb", "yopo", "freeat", "smart", "asa"])
def test_methods_beyond_one_backward_are_refused_with_the_way_to_run_them(method, tmp_path):
    with pytest.raises(
        ValueError,
        match=f"adversarial.method={method} needs more than Trainer's one backward per batch and optimizer; "
        "use `alum finetune`",
    ):
        trainer_for(dropout_free_classifier(), tmp_path, method=method)
