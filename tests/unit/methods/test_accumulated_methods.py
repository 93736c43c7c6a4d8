"""FreeLB, YOPO, amortized ALUM and FreeAT, the methods that use the gradient their own
backward leaves on delta, on a tiny real BERT: each one's defining property against a hand
computation of its formula."""

from __future__ import annotations

import pytest
import torch
from test_adversarial import Closures, batch, tiny_bert
from torch import Tensor

from pipeline.methods import accumulated
from pipeline.methods.adversarial import AdversarialConfig, compute_losses, objective, passes, run_objective
from pipeline.methods.freeat import ReplayPerturbation
from pipeline.methods.objective import kl, log_probs, mlm_loss
from pipeline.methods.registry import method_of
from pipeline.model import perturbation


def setup(train: bool = False):
    ids, mask, labels = batch()
    model = tiny_bert().train(train)
    return model, Closures(model, ids, mask), labels


def run(config: AdversarialConfig, train: bool = False):
    """The method's objective driven with plain `backward`s; (its StepLosses, the model, the
    losses it yielded, in order)."""
    model, closures, labels = setup(train)
    yielded = []

    def backward(loss):
        yielded.append(loss.detach())
        loss.backward()

    torch.manual_seed(7)
    out = run_objective(objective(closures.forward, closures.ascent_forward, labels, config=config, step=0), backward)
    return out, model, yielded, closures


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_grads(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [2, 3])
def test_freelb_parameter_gradient_is_the_mean_over_its_passes(k):
    config = AdversarialConfig(method="freelb", steps=k, start_step=0)
    out, model, yielded, closures = run(config)
    assert len(yielded) == k == len(closures.deltas) + 1  # pass 0 is the clean pass (delta = 0)
    # K separate backward passes at the same perturbations, averaged by hand.
    reference, _, labels = setup()
    separate = []
    for delta in [None, *[d.detach() for d in closures.deltas]]:
        reference.zero_grad()
        logits, _ = Closures(reference, *batch()[:2]).forward(delta)
        mlm_loss(logits, labels).backward()
        separate.append(grads(reference))
    assert_same_grads(grads(model), [torch.stack(g).mean(0) for g in zip(*separate)])
    assert out.loss_adv > 0 and torch.isclose(out.loss, sum(yielded))


def test_freelb_moves_delta_by_the_gradient_of_the_previous_pass():
    config = AdversarialConfig(method="freelb", steps=2, start_step=0, scale="absolute")
    _, _, _, closures = run(config)
    model, by_hand, labels = setup()
    logits, embedded = by_hand.forward(None)
    (g,) = torch.autograd.grad(mlm_loss(logits, labels), embedded)
    expected = perturbation.ascent_update(torch.zeros_like(g), g, torch.ones(()), config)
    torch.testing.assert_close(closures.deltas[0].detach(), expected, rtol=1e-5, atol=1e-8)


def test_yopo_makes_m_full_passes_and_m_times_n_updates(monkeypatch):
    calls = []
    real_update = perturbation.ascent_update
    monkeypatch.setattr(accumulated.perturbation, "ascent_update", lambda *a: calls.append(1) or real_update(*a))
    config = AdversarialConfig(method="yopo", steps=3, inner_steps=4, start_step=0, eps=0.5)
    out, _, yielded, closures = run(config)
    assert (
        len(yielded) == 3 == passes(config, 0) and len(closures.deltas) == 2
    )  # m backwards: the clean one and 2 perturbed
    assert len(calls) == 3 * 4
    assert out.delta_norm > 0


def test_yopo_inner_updates_reuse_one_gradient_inside_the_eps_ball():
    config = AdversarialConfig(
        method="yopo", steps=2, inner_steps=3, start_step=0, scale="absolute", eps=0.05, step_size=0.02
    )
    _, _, _, closures = run(config)
    model, by_hand, labels = setup()
    logits, embedded = by_hand.forward(None)
    (g,) = torch.autograd.grad(mlm_loss(logits, labels), embedded)
    expected = torch.zeros_like(g)
    for _ in range(3):
        expected = perturbation.ascent_update(expected, g, torch.ones(()), config)
    torch.testing.assert_close(closures.deltas[0].detach(), expected, rtol=1e-5, atol=1e-8)
    assert closures.deltas[0].abs().max() <= 0.05


def test_amortized_alum_gradient_is_its_stated_formula():
    config = AdversarialConfig(method="alum_amortized", start_step=0, noise_std=0.0, scale="absolute", step_size=0.5)
    out, model, yielded, closures = run(config)
    assert len(yielded) == 2 == passes(config, 0)
    # grad L_clean + alpha * grad KL(stopgrad(p) || q(delta)), delta = update(0, d L_clean / d e)
    reference, by_hand, labels = setup()
    logits, embedded = by_hand.forward(None)
    clean = mlm_loss(logits, labels)
    (g,) = torch.autograd.grad(clean, embedded, retain_graph=True)
    delta = perturbation.ascent_update(torch.zeros_like(g), g, torch.ones(()), config)
    torch.testing.assert_close(closures.deltas[0], delta, rtol=1e-5, atol=1e-8)
    q, _ = by_hand.forward(delta)
    (clean + config.alpha * kl(log_probs(logits).detach(), log_probs(q))).backward()
    assert_same_grads(grads(model), grads(reference))
    assert out.loss_adv > 0 and torch.isclose(out.loss, out.loss_mlm + config.alpha * out.loss_adv)


@pytest.mark.parametrize("method", ["freelb", "yopo", "alum_amortized", "freeat"])
def test_these_methods_are_standard_before_start_step_and_refuse_a_single_call(method):
    config = AdversarialConfig(method=method, start_step=5)
    assert passes(config, 4) == 1 and passes(config, 5) == {"freeat": 1, "alum_amortized": 2}.get(method, 2)
    model, closures, labels = setup()
    out = compute_losses(closures.forward, closures.ascent_forward, labels, config=config, step=4)
    assert torch.equal(out.loss, out.loss_mlm) and out.loss_adv == 0
    with pytest.raises(ValueError, match=f"adversarial.method={method} uses the gradient of its own backward"):
        compute_losses(closures.forward, closures.ascent_forward, labels, config=config, step=5)


def test_dropout_masks_are_the_clean_pass_s_in_every_freelb_pass():
    """With dropout on and delta = 0 in every pass (step size 0), every pass's loss equals the clean one."""
    out, _, yielded, _ = run(AdversarialConfig(method="freelb", steps=3, start_step=0, step_size=0.0), train=True)
    assert len(set(round(float(y), 7) for y in yielded)) == 1 and out.loss_adv == out.loss_mlm


def test_freeat_carries_its_perturbation_across_replays():
    config = AdversarialConfig(method="freeat", steps=2, start_step=0, scale="absolute", eps=2.0**-7)
    model, closures, labels = setup()
    carry = ReplayPerturbation()
    torch.manual_seed(7)
    run_objective(
        objective(closures.forward, closures.ascent_forward, labels, config=config, step=0, carry=carry),
        Tensor.backward,
    )
    assert closures.deltas == []  # replay 0 is at delta = 0
    first = carry.delta.clone()
    assert set(first.abs().unique().tolist()) <= {0.0, 2.0**-7} and (first.abs() == 2.0**-7).float().mean() > 0.99
    out = run_objective(
        objective(closures.forward, closures.ascent_forward, labels, config=config, step=1, carry=carry),
        Tensor.backward,
    )
    assert torch.equal(closures.deltas[0].detach(), first)  # replay 1 starts where replay 0 left delta
    grad = closures.deltas[0].grad
    torch.testing.assert_close(carry.delta, (first + 2.0**-7 * grad.sign()).clamp(-(2.0**-7), 2.0**-7))
    method = method_of(config)
    assert out.loss_adv > 0 and method.replay_index(1) == 1 and method.at_boundary(2) and not method.at_boundary(1)


# FreeLB as its code does it (zhuchen03/FreeLB, huggingface-transformers/examples/run_glue_freelb.py)


def test_freelb_normalises_its_step_over_each_sequence():
    """FreeLB's default `norm_over: sequence`: the step is ``adv_lr * g / ||g.view(B, -1)||``,
    so each sequence (not each token) moves by step_size in L2."""
    config = AdversarialConfig(method="freelb", start_step=0, scale="absolute", step_size=0.3)
    assert config.norm_over == "sequence" and config.norm == "l2" and config.perturb_at == "word_embeddings"
    alum = AdversarialConfig(method="alum")  # every other method: per token at the embedding output, as before
    assert (alum.norm_over, alum.perturb_at) == ("token", "embedding_output")
    generator = torch.Generator().manual_seed(4)
    grad = torch.randn(3, 5, 8, generator=generator) * torch.tensor([1.0, 10.0, 1e-3]).view(3, 1, 1)
    moved = perturbation.ascent_update(torch.zeros_like(grad), grad, torch.ones(()), config)
    by_freelb = 0.3 * grad / torch.norm(grad.view(3, -1), dim=1).view(-1, 1, 1)
    torch.testing.assert_close(moved, by_freelb)
    torch.testing.assert_close(torch.linalg.vector_norm(moved, dim=(1, 2)), torch.full((3,), 0.3))
    assert not torch.allclose(perturbation.token_norm(moved, "l2"), torch.full((3, 5), 0.3 / 5**0.5))


def test_freelb_default_moves_delta_by_the_sequence_normalised_gradient():
    config = AdversarialConfig(method="freelb", steps=2, start_step=0, scale="absolute")
    _, _, _, closures = run(config)
    model, by_hand, labels = setup()
    logits, embedded = by_hand.forward(None)
    (g,) = torch.autograd.grad(mlm_loss(logits, labels), embedded)
    expected = config.step_size * g / torch.norm(g.view(g.shape[0], -1), dim=1).view(-1, 1, 1)
    torch.testing.assert_close(closures.deltas[0].detach(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_sequence_ball_bounds_each_sequence_as_freelb_s_max_norm(norm):
    config = AdversarialConfig(method="freelb", start_step=0, scale="absolute", step_size=5.0, eps=0.5, norm=norm)
    generator = torch.Generator().manual_seed(6)
    grad = torch.randn(2, 4, 8, generator=generator)
    moved = perturbation.ascent_update(torch.zeros_like(grad), grad, torch.ones(()), config)
    if norm == "l2":  # each sequence scaled down as a whole to adv_max_norm
        torch.testing.assert_close(torch.linalg.vector_norm(moved, dim=(1, 2)), torch.full((2,), 0.5))
    else:  # clipped element-wise
        assert moved.abs().max() == pytest.approx(0.5)


def test_freelb_uniform_start_is_scaled_by_length_times_width():
    """``adv_init_mag / sqrt(length * H)`` times U(-1, 1) on the real tokens, 0 on padding."""
    embedded = torch.ones(2, 6, 8)
    real = torch.tensor([[1] * 6, [1] * 3 + [0] * 3]).bool()
    start = perturbation.uniform_start(embedded, torch.ones(()), real, 0.6, "l2", torch.Generator().manual_seed(0))
    assert start[1, 3:].abs().max() == 0
    for row, length in ((0, 6), (1, 3)):
        bound = 0.6 / (length * 8) ** 0.5
        assert 0.5 * bound < start[row, :length].abs().max() <= bound


def test_freelb_with_init_mag_trains_every_pass_from_the_random_start():
    """With `init_mag` the first pass is at FreeLB's random start, not the clean input; with
    step size 0 every pass stays there and (masks replayed) has the same loss."""
    config = AdversarialConfig(method="freelb", steps=3, start_step=0, step_size=0.0, init_mag=0.6, scale="absolute")
    out, _, yielded, closures = run(config, train=True)
    start = closures.deltas[0].detach()
    real = torch.ones(start.shape[:2])
    assert start.abs().max() > 0 and start.abs().max() <= 0.6 / (real.sum(1).max() * start.shape[-1]) ** 0.5
    assert len(set(round(float(y), 7) for y in yielded)) == 1
    clean = run(AdversarialConfig(method="freelb", steps=3, start_step=0, step_size=0.0), train=True)[0]
    assert out.loss_mlm != clean.loss_mlm  # pass 0 is perturbed: there is no clean pass


def test_init_mag_is_refused_where_no_random_start_is_drawn():
    with pytest.raises(ValueError, match=r"^init_mag: "):
        AdversarialConfig(method="alum", init_mag=0.6)
