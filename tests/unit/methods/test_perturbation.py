"""Perturbation mechanics: units, the three update rules, rounding loss; the full KL gradient; the vanishing guard."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from data_prep.errors import UserError
from pipeline.methods.adversarial import AdversarialConfig
from pipeline.methods.objective import symmetric_kl
from pipeline.model.perturbation import ascent_update, initial_noise, lost_fraction, real_mean, token_norm, token_scale
from pipeline.train import vanishing

ALUM = AdversarialConfig(method="alum")


def embeddings(scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, 16, generator=generator) * scale


# 1. Units


def test_relative_unit_is_each_tokens_rms():
    e = embeddings()
    e[0, 0] *= 7.0
    unit = token_scale(e, "relative")
    assert unit.shape == (2, 5, 1)
    assert torch.allclose(unit[..., 0], e.pow(2).mean(-1).sqrt())
    assert torch.equal(token_scale(e, "absolute"), torch.ones(2, 5, 1))


def test_relative_noise_and_steps_follow_the_embeddings_scale():
    """The same config perturbs embeddings 50x smaller by a 50x smaller delta (same direction)."""
    grad = embeddings().flip(-1)
    deltas = []
    for scale in (1.0, 0.02):
        e = embeddings(scale)
        unit = token_scale(e, "relative")
        torch.manual_seed(0)
        delta = initial_noise(e, unit, 0.01)
        deltas.append(ascent_update(delta, grad, unit, ALUM))
    assert torch.allclose(deltas[1], deltas[0] * 0.02, rtol=1e-5, atol=1e-9)


def test_noise_is_float32_for_a_bf16_model_and_float64_for_a_float64_one():
    e = embeddings().to(torch.bfloat16)
    assert initial_noise(e, token_scale(e, "relative"), 0.01).dtype == torch.float32
    e64 = embeddings().double()
    assert initial_noise(e64, token_scale(e64, "relative"), 0.01).dtype == torch.float64


# 2. Update rules


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_official_rule_gives_unit_per_token_norm(norm):
    e = embeddings()
    config = replace(
        ALUM, update="official", scale="absolute", norm=norm, noise_std=1e-5, step_size=1e-3, grad_eps=1e-12
    )
    unit = token_scale(e, config.scale)
    delta = initial_noise(e, unit, config.noise_std)
    out = ascent_update(delta, embeddings() * 1e-9, unit, config)
    assert torch.allclose(token_norm(out, norm), torch.ones(2, 5), rtol=1e-5)


def test_official_rule_with_relative_scale_gives_the_tokens_rms():
    e = embeddings(3.0)
    config = replace(ALUM, update="official", scale="relative")
    unit = token_scale(e, "relative")
    out = ascent_update(initial_noise(e, unit, config.noise_std), embeddings(), unit, config)
    assert torch.allclose(token_norm(out, "linf"), unit[..., 0], rtol=1e-5)


def test_official_rule_normalises_the_sum_not_the_gradient():
    delta = torch.tensor([[[1.0, 0.0]]])
    grad = torch.tensor([[[0.0, 2.0]]])
    config = replace(ALUM, update="official", scale="absolute", step_size=0.5, grad_eps=1e-12, norm="l2")
    expected = torch.tensor([[[1.0, 1.0]]]) / 2**0.5  # normalise(delta + 0.5 * grad)
    assert torch.allclose(ascent_update(delta, grad, torch.ones(()), config), expected)


def test_paper_rule_moves_by_step_size_times_the_unit():
    e = embeddings(4.0)
    unit = token_scale(e, "relative")
    config = replace(ALUM, update="paper", step_size=0.1, grad_eps=1e-12)
    moved = ascent_update(torch.zeros_like(e), embeddings(), unit, config)
    assert torch.allclose(token_norm(moved, "linf"), 0.1 * unit[..., 0], rtol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projected_rule_stays_in_the_eps_ball(norm):
    """`projected` (the unnormalised step, then Pi_eps): a step far longer than eps still lands
    in every token's ball, and tokens whose step stays inside are moved by step_size * g exactly."""
    generator = torch.Generator().manual_seed(5)
    delta = torch.randn(2, 6, 8, generator=generator) * 1e-3
    grad = torch.randn(2, 6, 8, generator=generator) * 10.0
    grad[1, 0] = 1e-6  # one token whose step stays inside the ball
    config = replace(ALUM, update="projected", scale="absolute", step_size=1.0, eps=0.01, norm=norm)
    out = ascent_update(delta, grad, torch.ones(()), config)
    assert (token_norm(out, norm) <= 0.01 * (1 + 1e-6)).all()
    assert token_norm(out, norm).max() == pytest.approx(0.01, rel=1e-5)
    assert torch.allclose(out[1, 0], delta[1, 0] + 1e-6)


def test_projected_rule_without_eps_is_the_plain_gradient_step():
    delta, grad = torch.zeros(1, 2, 4), torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1e-9]]])
    config = replace(ALUM, update="projected", scale="absolute", step_size=0.5)
    assert torch.equal(ascent_update(delta, grad, torch.ones(()), config), 0.5 * grad)


def test_paper_is_read_as_the_normalised_rule():
    config = replace(ALUM, update="paper")
    assert config.update == "normalised"
    assert AdversarialConfig().update == "normalised"  # the default rule, as before it was renamed
    generator = torch.Generator().manual_seed(2)
    delta, grad = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 3, 8, generator=generator)
    unit = torch.ones(())
    paper = ascent_update(delta, grad, unit, replace(ALUM, update="paper"))
    assert torch.equal(paper, ascent_update(delta, grad, unit, replace(ALUM, update="normalised")))


def test_relative_eps_ball_scales_with_the_unit():
    e = embeddings(2.0)
    unit = token_scale(e, "relative")
    config = replace(ALUM, eps=0.05, step_size=1.0, norm="l2")
    out = ascent_update(torch.zeros_like(e), embeddings(), unit, config)
    assert torch.allclose(token_norm(out, "l2"), 0.05 * unit[..., 0], rtol=1e-5)


# 3. What rounding loses


def test_bf16_loses_a_delta_of_1e_5_and_keeps_one_of_a_tenth():
    e = embeddings()
    real_tokens = torch.ones(2, 5, dtype=torch.bool)
    tiny, tenth = torch.full_like(e, 1e-5), torch.full_like(e, 0.1)
    assert lost_fraction(e, tiny, real_tokens).item() == 0.0  # float32 keeps it
    assert lost_fraction(e.to(torch.bfloat16), tiny, real_tokens).item() > 0.99
    assert lost_fraction(e.to(torch.bfloat16), tenth, real_tokens).item() < 0.01


def test_padding_is_not_counted():
    e = embeddings().to(torch.bfloat16)
    delta = torch.full(e.shape, 0.1)
    delta[:, 3:] = 1e-6  # lost, but on padding
    real_tokens = torch.ones(2, 5, dtype=torch.bool)
    real_tokens[:, 3:] = False
    assert lost_fraction(e, delta, real_tokens).item() < 0.01
    values = torch.arange(10.0).reshape(2, 5)
    assert real_mean(values, real_tokens).item() == pytest.approx((0 + 1 + 2 + 5 + 6 + 7) / 6)


# 4. The KL gradient


def undetached_symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) + q (log q - log p), mean over rows, written out and differentiated whole."""
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()


def grads(kl_grad: str | None, p0: torch.Tensor, q0: torch.Tensor):
    p, q = p0.clone().requires_grad_(), q0.clone().requires_grad_()
    loss = undetached_symmetric_kl(p, q) if kl_grad is None else symmetric_kl(p, q, kl_grad)
    loss.backward()
    return p.grad, q.grad, loss.item()


def test_full_kl_gradient_matches_autograd_of_the_undetached_symmetric_kl():
    generator = torch.Generator().manual_seed(0)
    p0, q0 = torch.randn(6, 11, generator=generator), torch.randn(6, 11, generator=generator)
    p_ref, q_ref, value_ref = grads(None, p0, q0)
    p_full, q_full, value = grads("full", p0, q0)
    assert value == pytest.approx(value_ref, rel=1e-6)
    assert torch.allclose(p_full, p_ref, atol=1e-6) and torch.allclose(q_full, q_ref, atol=1e-6)


def test_detached_gradient_is_half_the_full_one_near_q_equals_p():
    generator = torch.Generator().manual_seed(1)
    p0 = torch.randn(6, 11, generator=generator)
    q0 = p0 + 1e-3 * torch.randn(6, 11, generator=generator)
    _, q_full, _ = grads("full", p0, q0)
    _, q_detached, _ = grads("detached", p0, q0)
    ratio = q_detached.norm() / q_full.norm()
    cosine = torch.nn.functional.cosine_similarity(q_detached.flatten(), q_full.flatten(), dim=0)
    assert ratio.item() == pytest.approx(0.5, abs=5e-3) and cosine.item() > 0.999


# 5. The vanishing guard


def test_guard_warns_once_when_the_streak_reaches_vanish_steps():
    config = replace(ALUM, vanish_steps=3)
    lines = []
    for streak in (1, 2, 3, 4, 5):
        vanishing.check(config, streak=streak, step=100 + streak, ratio=1e-9, lost=0.997, announce=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: step 103: ")
    assert "adversarial.noise_std" in lines[0] and "99.7%" in lines[0] and "1.00e-09" in lines[0]


def test_guard_error_stops_with_a_user_error_naming_the_keys():
    config = replace(ALUM, vanish_steps=2, on_vanish="error")
    vanishing.check(config, streak=1, step=5, ratio=0.0, lost=0.0, announce=print)
    with pytest.raises(UserError, match=r"adversarial.step_size.*adversarial.grad_eps.*on_vanish=error"):
        vanishing.check(config, streak=2, step=6, ratio=0.0, lost=0.0, announce=print)


def test_a_ratio_below_the_floor_or_a_delta_mostly_lost_has_vanished():
    assert not vanishing.vanished(ALUM, ALUM.vanish_ratio, 0.05)
    assert vanishing.vanished(ALUM, ALUM.vanish_ratio / 2, 0.0)
    assert vanishing.vanished(ALUM, float("nan"), 0.0)
    assert vanishing.vanished(ALUM, 1e-3, 0.96)  # what is left is rounding noise


@pytest.mark.parametrize("lost", [0.0, 0.9])
def test_the_guard_advises_only_changes_to_the_config(lost):
    """It advised `adversarial.scale=relative` to runs already relative (the shipped configs)."""
    relative = vanishing.message(ALUM, 85, 1e-7, lost)
    absolute = vanishing.message(replace(ALUM, scale="absolute"), 85, 1e-7, lost)
    assert "scale=relative" not in relative and absolute.endswith(", or use adversarial.scale=relative")
    assert "raise adversarial" in relative


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_rule_has_the_normalised_size_and_not_its_direction(norm):
    """`random` (the study's noise control): each token's step is as long as the normalised
    rule's, and its direction does not follow the gradient (cosine near 0, not 1)."""
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(4, 16, 64, generator=generator)
    unit = torch.rand(4, 16, 1, generator=generator) + 0.5
    zero = torch.zeros_like(grad)
    torch.manual_seed(0)
    noise = ascent_update(zero, grad, unit, replace(ALUM, update="random", norm=norm, grad_eps=1e-12))
    aligned = ascent_update(zero, grad, unit, replace(ALUM, update="normalised", norm=norm, grad_eps=1e-12))
    assert torch.allclose(token_norm(noise, norm), token_norm(aligned, norm), rtol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(noise, grad, dim=-1)
    assert cosine.abs().mean() < 0.2
    assert torch.nn.functional.cosine_similarity(aligned, grad, dim=-1).mean() > 0.5
