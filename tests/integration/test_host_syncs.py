"""The training step waits for the accelerator once: no host sync in an ALUM or ASA
micro-batch, the libraries' code included, and one read-back of the step's all-reduced
numbers besides DeepSpeed's own syncs (counted by tests/support/host_syncs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, SUPPORT
from host_syncs import HostSyncs
from transformers import BertConfig, BertForMaskedLM

from pipeline.methods.adversarial import AdversarialConfig, objective, run_objective
from pipeline.methods.asa import AsaConfig, AttentionAdversaries
from pipeline.model.masked_lm import MaskedLM


def test_the_counter_sees_each_kind_of_sync_where_it_happens():
    x, keep = torch.randn(4, 3), torch.tensor([True, False, True, False])
    with HostSyncs() as counter:
        (
            x[keep],
            x.sum().item(),
            bool(x.sum() > 0),
            x.sum(0).tolist(),
            torch.where(x > 0, x, 0),
            x.index_select(0, keep.nonzero()[:, 0]),
        )
        counter.mark("halfway")
        x[keep] = 0.0
        (
            torch.equal(x, x),
            torch.unique(keep),
            torch.bincount(keep.long()),
            torch.repeat_interleave(torch.tensor([1, 2])),
        )
        x[torch.tensor([0, 2])] = 1.0  # an index of positions, not a mask: no sync
    assert [op for _, op in counter.syncs] == [
        "aten.index.Tensor",
        "aten._local_scalar_dense.default",
        "aten._local_scalar_dense.default",
        "aten.nonzero.default",
        "aten.index_put_.default",
        "aten.equal.default",
        "aten._unique2.default",
        "aten.bincount.default",
        "aten.repeat_interleave.Tensor",
    ]
    assert [kind for kind, _, _ in counter.events].index("read_back") == 3 and counter.events[5][::2] == (
        "mark",
        "halfway",
    )
    assert all(where.startswith(__file__) for where, _ in counter.syncs) and len(counter.read_backs) == 1


def micro_batch(method: str, attention: torch.Tensor | None):
    """One micro-batch of `method` on a tiny BERT (dropout on) under the counter: (the
    counter, its numbers, the model's gradients)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = MaskedLM(BertForMaskedLM(config).train())
    adversaries = AttentionAdversaries(model.hf, AsaConfig()) if method == "asa" else None
    ids = torch.randint(5, 100, (2, 16))
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, [3, 7, 11]] = True
    index, labels = masked.flatten().nonzero()[:, 0], ids[masked]
    losses = objective(
        lambda d: model(ids, attention, index, d),
        lambda d: model(ids, attention, index, d)[0],
        labels,
        config=AdversarialConfig(method=method, steps=2),
        step=0,
        real_tokens=attention,
        adversaries=adversaries,
    )
    with HostSyncs() as counter:
        stats = run_objective(losses, lambda loss: loss.backward()).stats()
    return counter, stats, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("method", ["alum", "asa"])
def test_a_micro_batch_without_padding_has_no_host_sync_and_equals_one_with_a_mask_of_ones(method):
    """Every sync counted, the libraries' included. Given a mask, transformers' SDPA mask code
    asks the device whether every token is real (masking_utils.py `padding_mask.all()`) once
    per forward: a batch of packed rows passes no mask (pipeline.data.batches.masked_batch), and
    computes exactly what the mask of ones computes."""
    counter, stats, grads = micro_batch(method, None)
    assert counter.syncs == [] and counter.read_backs == []
    assert stats[2] > 0  # loss_adv
    ones_counter, ones_stats, ones_grads = micro_batch(method, torch.ones(2, 16, dtype=torch.long))
    assert torch.equal(stats, ones_stats) and all(torch.equal(a, b) for a, b in zip(grads, ones_grads) if a is not None)
    forwards = {"alum": 4, "asa": 2}[method]  # ALUM (K = 2): clean, 2 ascents, adversarial; ASA: clean, masked
    assert [(where.split("site-packages/")[-1], op) for where, op in ones_counter.syncs] == [
        ("transformers/masking_utils.py:354", "aten._local_scalar_dense.default")
    ] * forwards


# DeepSpeed's own syncs in a ZeRO-2 fp32 step with two parameter groups (decay, no decay);
# every other library's and the project's are gone.
DEEPSPEED_SYNCS = {
    # is_invalid_grad_norm's bool() on the gradient norm: once in the ZeRO-1/2 step's overflow
    # check (stage_1_and_2.py:3043; skipped in bf16: fp32 and fp16 ask the host whether to
    # skip the update) and once per parameter group in its clipping (stage_1_and_2.py:3203,
    # unscale_and_clip_grads). DeepSpeed decides on the host; nothing to change here.
    "deepspeed/runtime/utils.py:233 aten._local_scalar_dense.default": 3,
    # ZeRO's call of torch.optim.AdamW.step, which reads its step count with .item() once per
    # parameter group (torch/optim/optimizer.py _get_value). CPU only: that count is a host
    # tensor on every device (not capturable), and on CUDA the engine runs FusedAdam.
    "deepspeed/runtime/zero/stage_1_and_2.py:2983 aten._local_scalar_dense.default": 2,
}


@pytest.mark.slow
def test_a_training_step_reads_back_once_besides_deepspeeds_own_syncs(tmp_path, train_shards, bert_tokenizer):
    """Every sync of `alum pretrain`'s steps, the libraries' included (tests/support/count_step_syncs.py):
    4 steps of 2 micro-batches, ALUM from step 2, on a one-rank ZeRO-2 engine. A step reads
    its numbers back once, and the next step's batch is built before that read-back. Before
    packed rows passed no attention mask, transformers added one sync per forward
    (masking_utils.py:354, `padding_mask.all()`): 2 in a standard step, 6 in an ALUM one."""
    out = tmp_path / "syncs.json"
    overrides = [
        f"data.shards={train_shards}",
        f"data.tokenizer={bert_tokenizer}",
        "train.max_steps=4",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "adversarial.method=alum",
        "adversarial.start_step=2",
        "eval.every_steps=0",
        "train.log_every=100",
        "checkpoint.every_steps=100",
        "wandb.mode=disabled",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{SUPPORT}"}
    result = subprocess.run(
        [sys.executable, str(SUPPORT / "count_step_syncs.py"), str(tmp_path / "run"), str(out), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pieces = json.loads(out.read_text())
    assert len(pieces) == 4 and pieces[0]["marks"] == ["batch 0", "batch 1"]
    for step, piece in enumerate(pieces[1:], start=1):  # piece 0 holds the set-up too
        assert piece["syncs"] == DEEPSPEED_SYNCS, (step, piece)
        assert len(piece["read_backs"]) == 1 and piece["read_backs"][0].startswith("pipeline/train/step.py:"), (
            step,
            piece,
        )
        assert piece["marks"] == ([f"batch {step + 1}"] if step < 3 else []), (
            step,
            piece,
        )  # the next batch, before the read-back
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["train/loss_adv"] > 0


def test_the_alum_loss_runs_without_importing_deepspeed():
    """The function-level API serves plain PyTorch and HF Trainer loops: DeepSpeed stays out."""
    code = """
import sys, torch
from transformers import BertConfig, BertForMaskedLM
from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.model.masked_lm import MaskedLM
model = MaskedLM(BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
intermediate_size=32)))
ids = torch.randint(5, 50, (2, 8))
def forward(delta):
    return model(ids, torch.ones_like(ids), torch.tensor([1, 9]), delta)
out = compute_losses(forward, lambda d: forward(d)[0], ids.flatten()[[1, 9]], config=AdversarialConfig(method="alum"),
                     step=0)
out.loss.backward()
print(float(out.loss_adv) > 0, "deepspeed" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False"]
