"""The training step waits for the accelerator once: no host sync in the ALUM objective or
the step, one read-back of the step's all-reduced numbers (counted by tests/host_syncs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from host_syncs import HostSyncs
from pipeline.adversarial import AdversarialConfig, objective, run_objective
from pipeline.asa import AsaConfig, AttentionAdversaries
from pipeline.model import MaskedLM

REPO_TESTS = os.path.dirname(__file__)
PIPELINE = os.path.join(os.path.dirname(REPO_TESTS), "pipeline")


def test_the_counter_sees_item_bool_tolist_and_boolean_gathers():
    x, keep = torch.randn(4, 3), torch.tensor([True, False, True, False])
    with HostSyncs() as counter:
        x[keep], x.sum().item(), bool(x.sum() > 0), x.sum(0).tolist(), torch.where(x > 0, x, 0), x.index_select(0, keep.nonzero()[:, 0])
    assert [op for _, op in counter.syncs] == ["aten.index.Tensor", "aten._local_scalar_dense.default", "aten._local_scalar_dense.default",
                                               "aten.nonzero.default"]
    assert len(counter.read_backs) == 1


def micro_batch(method: str, attention: torch.Tensor | None):
    """One micro-batch of `method` on a tiny BERT (dropout on) under the counter: (the
    counter, its numbers, the model's gradients)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = MaskedLM(BertForMaskedLM(config).train())
    adversaries = AttentionAdversaries(model.hf, AsaConfig()) if method == "asa" else None
    ids = torch.randint(5, 100, (2, 16))
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, [3, 7, 11]] = True
    index, labels = masked.flatten().nonzero()[:, 0], ids[masked]
    losses = objective(lambda d: model(ids, attention, index, d), lambda d: model(ids, attention, index, d)[0], labels,
                       AdversarialConfig(method=method, steps=2), 0, real=attention, adversaries=adversaries)
    with HostSyncs() as counter:
        stats = run_objective(losses, lambda loss: loss.backward()).stats()
    return counter, stats, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("method", ["alum", "asa"])
def test_a_micro_batch_without_padding_has_no_host_sync_and_equals_one_with_a_mask_of_ones(method):
    """Every sync counted, the libraries' included. Given a mask, transformers' SDPA mask code
    asks the device whether every token is real (masking_utils.py `padding_mask.all()`) once
    per forward: a batch of packed rows passes no mask (pipeline.data.masked_batch), and
    computes exactly what the mask of ones computes."""
    counter, stats, grads = micro_batch(method, None)
    assert counter.syncs == [] and counter.read_backs == []
    assert stats[2] > 0  # loss_adv
    ones_counter, ones_stats, ones_grads = micro_batch(method, torch.ones(2, 16, dtype=torch.long))
    assert torch.equal(stats, ones_stats) and all(torch.equal(a, b) for a, b in zip(grads, ones_grads) if a is not None)
    forwards = {"alum": 4, "asa": 2}[method]  # ALUM (K = 2): clean, 2 ascents, adversarial; ASA: clean, masked
    assert [(where.split("site-packages/")[-1], op) for where, op in ones_counter.syncs] == \
        [("transformers/masking_utils.py:354", "aten._local_scalar_dense.default")] * forwards


@pytest.mark.slow
def test_training_steps_on_a_deepspeed_engine_read_back_once_per_step(tmp_path, train_shards, bert_tokenizer):
    out = tmp_path / "syncs.json"
    overrides = [f"data.shards={train_shards}", f"data.tokenizer={bert_tokenizer}", "train.max_steps=2", "train.global_batch_size=8",
                 "train.micro_batch_size=4", "adversarial.method=alum", "adversarial.start_step=0", "eval.every_steps=0"]
    env = {**os.environ, "PYTHONPATH": f"{os.path.dirname(REPO_TESTS)}:{REPO_TESTS}"}
    result = subprocess.run([sys.executable, os.path.join(REPO_TESTS, "count_step_syncs.py"), str(tmp_path / "run"), str(out), *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert counts["steps"] == 2 and counts["micro_batches"] == 2 and counts["loss_adv"] > 0
    assert counts["pipeline_syncs"] == []
    assert len(counts["pipeline_read_backs"]) == 2 and all("pipeline/step.py" in where for where in counts["pipeline_read_backs"])


def test_the_alum_loss_runs_without_importing_deepspeed():
    """The function-level API serves plain PyTorch and HF Trainer loops: DeepSpeed stays out."""
    code = """
import sys, torch
from transformers import BertConfig, BertForMaskedLM
from pipeline.adversarial import AdversarialConfig, compute_losses
from pipeline.model import MaskedLM
model = MaskedLM(BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
ids = torch.randint(5, 50, (2, 8))
out = compute_losses(lambda d: model(ids, torch.ones_like(ids), torch.tensor([1, 9]), d), lambda d: model(ids, torch.ones_like(ids), torch.tensor([1, 9]), d)[0],
                     ids.flatten()[[1, 9]], AdversarialConfig(method="alum"), 0)
out.loss.backward()
print(float(out.loss_adv) > 0, "deepspeed" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(REPO_TESTS)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False"]
