"""FGSM, FGM and PGD on a tiny real BERT with dropout on: each method's defining property,
its loss formula, and the fall-back to the clean loss on a non-finite term."""

from __future__ import annotations

import pytest
import torch
from test_adversarial import batch, clean_loss, run_step

from pipeline.methods.adversarial import AdversarialConfig
from pipeline.methods.objective import mlm_loss
from pipeline.model.perturbation import token_norm

EPS = 2.0**-4  # exact in float32, so delta's elements can equal it
ABSOLUTE = dict(scale="absolute", eps=EPS)  # sizes in plain units: delta itself must have the size


def test_fgsm_step_is_eps_times_a_sign():
    result, closures = run_step(AdversarialConfig(method="fgsm", **ABSOLUTE))
    (delta,) = closures.deltas
    assert set(delta.abs().unique().tolist()) <= {0.0, EPS} and (delta.abs() == EPS).float().mean() > 0.99
    # The sign is the clean loss's input gradient at delta = 0 (same dropout masks).
    start = torch.zeros_like(delta, requires_grad=True)
    torch.manual_seed(7)
    closures.forward(None)
    torch.manual_seed(7)
    (grad,) = torch.autograd.grad(mlm_loss(closures.ascent_forward(start), batch()[2]), start)
    assert torch.equal(delta, EPS * grad.sign())


def test_fgm_perturbation_has_norm_eps_per_token():
    _, closures = run_step(AdversarialConfig(method="fgm", **ABSOLUTE))
    (delta,) = closures.deltas
    torch.testing.assert_close(token_norm(delta, "l2"), torch.full(delta.shape[:-1], EPS), rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_inside_the_eps_ball(norm):
    _, closures = run_step(AdversarialConfig(method="pgd", steps=4, norm=norm, **ABSOLUTE))
    assert len(closures.ascent_deltas) == 4 and len(closures.deltas) == 1
    for delta in [*closures.ascent_deltas, closures.deltas[0]]:
        assert token_norm(delta, norm).max() <= EPS * (1 + 1e-6)
    # It moves: the last delta is on the boundary for most tokens, not at the random start.
    assert (token_norm(closures.deltas[0], norm) > 0.99 * EPS).float().mean() > 0.5


@pytest.mark.parametrize("method, clean_weight, adv_weight", [("fgsm", 0.5, 0.5), ("fgm", 1.0, 1.0), ("pgd", 0.0, 1.0)])
def test_each_loss_weighs_clean_and_adversarial_as_its_paper(method, clean_weight, adv_weight):
    result, _ = run_step(AdversarialConfig(method=method, **ABSOLUTE))
    assert result.loss_adv > 0 and not result.skipped
    expected = clean_weight * result.loss_mlm.item() + adv_weight * result.loss_adv.item()
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(result.loss_mlm, clean_loss())


def test_pgd_trains_on_the_adversarial_loss_alone():
    result, closures = run_step(AdversarialConfig(method="pgd", **ABSOLUTE))
    assert not result.loss_mlm.requires_grad  # the clean pass ran without a graph
    result.loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in closures.model.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("method", ["fgsm", "fgm"])
@pytest.mark.parametrize("poison", ["ascent_poison", "adversarial_poison"])
def test_a_non_finite_term_falls_back_to_the_clean_loss(method, poison):
    result, closures = run_step(AdversarialConfig(method=method, **ABSOLUTE), **{poison: float("nan")})
    assert result.skipped and result.loss_adv == 0.0
    assert torch.equal(result.loss, clean_loss())
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in closures.model.parameters())


def test_pgd_drops_the_micro_batch_on_a_non_finite_term():
    result, _ = run_step(AdversarialConfig(method="pgd", **ABSOLUTE), adversarial_poison=float("nan"))
    assert result.skipped and result.loss.item() == 0.0 and torch.isfinite(result.loss_mlm)


def test_without_eps_the_size_is_the_step_size():
    _, closures = run_step(AdversarialConfig(method="fgm", scale="absolute", step_size=0.25))
    torch.testing.assert_close(
        token_norm(closures.deltas[0], "l2"), torch.full(closures.deltas[0].shape[:-1], 0.25), rtol=1e-5, atol=0
    )
