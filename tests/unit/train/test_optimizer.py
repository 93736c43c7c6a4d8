"""The optimizer every accelerator gets: torch's AdamW (nothing to compile), and checkpoints
written with DeepSpeed's FusedAdam (what CUDA runs used before) still load into it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.train.deepspeed_setup import make_optimizer

TRAIN = SimpleNamespace(lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def moments(module: torch.nn.Module) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"exp_avg": torch.randn(p.shape, generator=generator), "exp_avg_sq": torch.rand(p.shape, generator=generator)}
        for p in module.parameters()
    ]


def stepped(state_of_group, state_of_param) -> list[torch.Tensor]:
    """The parameters after one step from a saved optimizer state in the given layout."""
    module = model()
    optimizer = make_optimizer(module, TRAIN, {})
    saved = optimizer.state_dict()
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's numbering
    by_param = dict(zip(map(id, module.parameters()), moments(module)))
    saved["state"] = {i: state_of_param(by_param[id(p)]) for i, p in enumerate(ordered)}
    saved["param_groups"] = [state_of_group(group) for group in saved["param_groups"]]
    optimizer.load_state_dict(saved)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return [p.detach().clone() for p in module.parameters()]


def test_every_accelerator_gets_torchs_adamw():
    optimizer = make_optimizer(model(), TRAIN, {"zero_optimization": {"stage": 2}})
    assert type(optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # no decay on biases and norms


def test_a_fused_adam_checkpoint_steps_as_a_native_one():
    native = stepped(lambda group: group, lambda m: {"step": torch.tensor(5.0), **m})
    # FusedAdam's layout: an integer step, its own group keys, none of torch's.
    fused_keys = ("lr", "betas", "eps", "weight_decay", "params")
    fused = stepped(
        lambda group: {**{k: group[k] for k in fused_keys}, "bias_correction": True, "step": 5},
        lambda m: {"step": 5, **m},
    )
    # Equal to the native state's step, decoupled weight decay included (Adam's L2 decay would differ).
    assert all(torch.equal(a, b) for a, b in zip(native, fused))
