"""The ALUM objective on a tiny real BERT with dropout on: values, gradients, fallbacks, replay."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import minimal
from transformers import BertConfig, BertForMaskedLM

from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.methods.objective import kl, log_probs, mlm_loss, symmetric_kl
from pipeline.model.masked_lm import MaskedLM
from pipeline.model.perturbation import ascent_update, token_norm
from pipeline.train.config import load_config

torch.set_num_threads(1)

VOCAB = 100
MASK_ID = 4
ALUM = AdversarialConfig(method="alum")
# The official code's magnitudes, in plain units: the tests of the update's mechanics use them.
OFFICIAL_SIZES = replace(ALUM, scale="absolute", step_size=1e-3, noise_std=1e-5, grad_eps=1e-6)
ONE = torch.ones(())  # the unit of sizes with scale=absolute


def tiny_bert(**changes) -> BertForMaskedLM:
    """Two layers, hidden 32, dropout 0.1 left on: small enough for CPU, real enough to matter."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **changes,
    )
    return BertForMaskedLM(config).train()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of 12 tokens with 3 masked positions each; returns ids, mask, labels."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 12), generator=generator)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, [2, 5, 9]] = True
    labels = ids[mask]
    return ids.masked_fill(mask, MASK_ID), mask, labels


class Closures:
    """The trainer's two callables for a plain HF model, perturbing the word embeddings.

    Records the deltas each pass receives, so tests can inspect the initial and final perturbation.
    ``ascent_poison`` / ``adversarial_poison`` are added to that pass's logits.
    """

    def __init__(self, model, ids, mask, ascent_poison=0.0, adversarial_poison=0.0):
        self.model, self.ids, self.mask = model, ids, mask
        self.ascent_poison, self.adversarial_poison = ascent_poison, adversarial_poison
        self.deltas: list[torch.Tensor] = []
        self.ascent_deltas: list[torch.Tensor] = []

    def run(self, delta):
        embedded = self.model.bert.embeddings.word_embeddings(self.ids)
        delta = delta(embedded) if callable(delta) else delta
        inputs = (
            embedded if delta is None else embedded + delta.to(embedded.dtype)
        )  # as pipeline.model.masked_lm.Perturbation adds it
        logits = self.model(inputs_embeds=inputs, attention_mask=torch.ones_like(self.ids)).logits
        return logits[self.mask], embedded

    def forward(self, delta):
        logits, embedded = self.run(delta)
        if delta is not None and not callable(delta):
            self.deltas.append(delta)
            logits = logits + self.adversarial_poison
        return logits, embedded

    def ascent_forward(self, delta):
        self.ascent_deltas.append(delta.detach().clone())
        return self.run(delta)[0] + self.ascent_poison


def run_step(config: AdversarialConfig, seed: int = 7, step: int = 0, **poison):
    """compute_losses on a fresh tiny BERT from a fixed RNG state; returns (losses, closures)."""
    ids, mask, labels = batch()
    closures = Closures(tiny_bert(), ids, mask, **poison)
    torch.manual_seed(seed)
    return compute_losses(closures.forward, closures.ascent_forward, labels, config=config, step=step), closures


def clean_loss(seed: int = 7) -> torch.Tensor:
    """The standard MLM loss with the dropout masks that seed gives the clean pass."""
    ids, mask, labels = batch()
    closures = Closures(tiny_bert(), ids, mask)
    torch.manual_seed(seed)
    return mlm_loss(closures.forward(None)[0], labels)


# 1. Reduction to the standard objective


def test_method_none_is_exactly_the_clean_mlm_loss():
    result, _ = run_step(AdversarialConfig(method="none"))
    assert torch.equal(result.loss, clean_loss())
    assert (result.loss_adv, result.delta_norm, result.adv_grad_norm, result.delta_lost, result.skipped) == (
        0.0,
        0.0,
        0.0,
        0.0,
        False,
    )


def test_alpha_zero_is_exactly_the_standard_loss_though_the_term_is_computed():
    result, _ = run_step(replace(ALUM, alpha=0.0))
    assert torch.equal(result.loss, clean_loss())
    assert result.loss_adv > 0 and not result.skipped


def test_before_start_step_the_term_is_off():
    config = replace(ALUM, start_step=100)
    assert not config.active(99) and config.active(100)
    assert not AdversarialConfig(method="none").active(10**6)
    result, closures = run_step(config, step=99)
    assert torch.equal(result.loss, clean_loss()) and result.loss_adv == 0.0
    assert closures.deltas == []


def test_total_is_mlm_plus_alpha_times_symmetric_kl():
    result, _ = run_step(ALUM)
    assert result.loss_adv > 0
    assert result.loss.item() == pytest.approx(result.loss_mlm.item() + 10.0 * result.loss_adv.item(), rel=1e-6)


def test_ascent_increases_the_divergence_over_the_initial_noise():
    noise_only, _ = run_step(replace(OFFICIAL_SIZES, step_size=0.0))
    ascended, _ = run_step(OFFICIAL_SIZES)
    assert ascended.loss_adv > 100 * noise_only.loss_adv


# 2. Gradients


def test_ascent_pass_leaves_no_parameter_gradients():
    result, closures = run_step(ALUM)
    params = list(closures.model.parameters())
    assert all(p.grad is None for p in params)
    result.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# 3. The perturbation's size


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ascent_update_projects_every_token_onto_the_eps_ball(norm):
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 6, 8, generator=generator) * 0.02
    delta[0, 0] = 0.0  # one token starts at the origin: the step alone must be projected
    grad = torch.randn(2, 6, 8, generator=generator)
    config = replace(OFFICIAL_SIZES, eps=0.01, norm=norm, step_size=0.5)
    out = ascent_update(delta, grad, ONE, config)
    assert (token_norm(out, norm) <= 0.01 + 1e-7).all()
    assert token_norm(out, norm).max() == pytest.approx(0.01, rel=1e-5)


def test_l2_projection_leaves_tokens_inside_the_ball_alone():
    delta = torch.zeros(1, 2, 4)
    grad = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])
    config = replace(OFFICIAL_SIZES, norm="l2", step_size=0.1, eps=1.0, grad_eps=1e-12)
    expected = torch.tensor([[[0.06, 0.08, 0.0, 0.0], [0.0, 0.0, 0.0, 0.1]]])
    assert torch.allclose(ascent_update(delta, grad, ONE, config), expected)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_final_delta_of_a_step_respects_eps(norm):
    eps = 1e-5
    _, closures = run_step(replace(OFFICIAL_SIZES, eps=eps, norm=norm))
    (delta,) = closures.deltas
    assert (token_norm(delta, norm) <= eps * (1 + 1e-5)).all()


def test_without_eps_one_linf_step_moves_every_token_by_step_size():
    # A tiny normaliser epsilon, so the step is set by step_size rather than by grad_eps.
    result, closures = run_step(replace(OFFICIAL_SIZES, grad_eps=1e-12))
    (start,), (delta,) = closures.ascent_deltas, closures.deltas
    assert token_norm(start, "linf").max() < 1e-4  # the N(0, 1e-5^2) start
    moved = token_norm(delta - start, "linf")
    assert torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=1e-3)
    assert result.delta_norm == pytest.approx(1e-3, rel=0.05)
    assert result.adv_grad_norm > 0


def test_grad_eps_shrinks_the_step_when_the_gradient_is_small():
    grad = torch.full((1, 1, 4), 1e-6)
    config = replace(ALUM, scale="absolute", step_size=1e-3, grad_eps=1e-6)
    out = ascent_update(torch.zeros(1, 1, 4), grad, ONE, config)
    assert torch.allclose(out, torch.full((1, 1, 4), 5e-4))


# 4. Symmetric KL


def hand_kl(p_logits, q_logits) -> float:
    """Sum over vocabulary of p * log(p / q), averaged over rows, in plain Python floats."""
    total = 0.0
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist()):
        p_z = sum(math.exp(v) for v in p_row)
        q_z = sum(math.exp(v) for v in q_row)
        for a, b in zip(p_row, q_row):
            p, q = math.exp(a) / p_z, math.exp(b) / q_z
            total += p * math.log(p / q)
    return total / len(p_logits)


P = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
Q = torch.tensor([[0.0, 0.5, 1.0], [0.5, 1.0, -0.5]])


def test_symmetric_kl_matches_hand_computation():
    expected = hand_kl(P, Q) + hand_kl(Q, P)
    assert symmetric_kl(P, Q).item() == pytest.approx(expected, rel=1e-6)


def test_symmetric_kl_is_zero_for_identical_inputs_and_symmetric():
    assert symmetric_kl(P, P.clone()).item() == 0.0
    assert symmetric_kl(P, Q).item() == pytest.approx(symmetric_kl(Q, P).item(), rel=1e-6)


def test_symmetric_kl_detaches_each_target_like_mt_dnn():
    # With stopgrad(p) as the target, d/dq of KL(p||q) is (softmax(q) - softmax(p)) / N,
    # and the reverse term's target (q) contributes nothing to q's gradient.
    p, q = P.clone().requires_grad_(), Q.clone().requires_grad_()
    symmetric_kl(p, q).backward()
    expected = (Q.softmax(-1) - P.softmax(-1)) / len(P)
    assert torch.allclose(q.grad, expected, atol=1e-7)
    assert torch.allclose(p.grad, -expected, atol=1e-7)


# 5. Non-finite fallbacks


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_ascent_gradient_falls_back_to_the_clean_loss(poison):
    result, closures = run_step(ALUM, ascent_poison=poison)
    assert result.skipped and result.loss_adv == 0.0
    assert torch.equal(result.loss, clean_loss())
    assert len(closures.deltas) == 1  # the adversarial pass still ran: ranks stay in step
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in closures.model.parameters())


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_adversarial_loss_falls_back_to_the_clean_loss(poison):
    result, closures = run_step(ALUM, adversarial_poison=poison)
    assert result.skipped and result.loss_adv == 0.0
    assert torch.equal(result.loss, clean_loss())
    # Dropped with torch.where, not a host-side branch: the adversarial pass is still in the
    # graph, and must send back exact zeros, not NaN, to the parameter gradients.
    result.loss.backward()
    clean, reference = run_step(replace(ALUM, method="none"))
    clean.loss.backward()
    for p, q in zip(closures.model.parameters(), reference.model.parameters()):
        assert torch.equal(p.grad, q.grad)


# 6. Dropout replay


def test_passes_replay_the_clean_dropout_masks():
    config = replace(ALUM, noise_std=0.0, step_size=0.0)
    result, _ = run_step(config)
    assert result.loss_adv == 0.0 and not result.skipped


def test_independent_dropout_gives_a_divergence_at_delta_zero():
    """`dropout: independent` (the official ALUM and ASA code): the adversarial pass draws its
    own masks, so even at delta = 0 it differs from the clean pass; replayed masks give 0."""
    at_zero = replace(ALUM, noise_std=0.0, step_size=0.0)
    independent, _ = run_step(replace(at_zero, dropout="independent"))
    replayed, _ = run_step(at_zero)
    assert independent.loss_adv > 1e-4 and not independent.skipped
    assert replayed.loss_adv == 0.0


def test_independent_dropout_without_dropout_in_the_model_is_the_replay():
    ids, mask, labels = batch()
    results = []
    for dropout in ("replay", "independent"):
        closures = Closures(tiny_bert().eval(), ids, mask)
        torch.manual_seed(7)
        config = replace(ALUM, dropout=dropout)
        results.append(compute_losses(closures.forward, closures.ascent_forward, labels, config=config, step=0))
    assert torch.equal(results[0].loss, results[1].loss)


def test_dropout_is_active_without_replay():
    ids, mask, _ = batch()
    closures = Closures(tiny_bert(), ids, mask)
    first, second = closures.forward(None)[0], closures.forward(None)[0]
    assert not torch.allclose(first, second)


def test_rng_advances_so_the_next_step_gets_new_masks():
    ids, mask, labels = batch()
    closures = Closures(tiny_bert(), ids, mask)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = compute_losses(closures.forward, closures.ascent_forward, labels, config=ALUM, step=0)
    assert not torch.equal(torch.get_rng_state(), before)
    second = compute_losses(closures.forward, closures.ascent_forward, labels, config=ALUM, step=1)
    assert not torch.equal(first.loss_mlm, second.loss_mlm)


# 6b. The embedding layer's gradient from the adversarial pass (embedding_grad)


def adversarial_pass_gradients(embedding_grad: str, perturb_at: str = "embedding_output"):
    """One ALUM micro-batch through `MaskedLM` (the real perturbation hook): the gradients on the
    embedding layer's weights of the clean loss and of the adversarial pass's KL(stopgrad(p) || q).
    The output layer is untied from the word embeddings: tied (BERT's default), the LM head's
    copy of the weights gets the term's gradient whatever the embedding layer gets."""
    model = MaskedLM(tiny_bert(tie_word_embeddings=False), perturb_at)
    ids, mask, labels = batch()
    masked_index = mask.flatten().nonzero().squeeze(1)
    passes = []

    def forward(delta):
        logits, embedded = model(ids, None, masked_index, delta)
        passes.append((delta, logits))
        return logits, embedded

    def ascent_forward(delta):
        return model(ids, None, masked_index, delta)[0]

    torch.manual_seed(7)
    config = replace(ALUM, embedding_grad=embedding_grad, perturb_at=perturb_at)
    result = compute_losses(forward, ascent_forward, labels, config=config, step=0)
    (_, clean_logits), (_, adversarial_logits) = passes
    # The layers before delta: the word embeddings, or all of the embedding layer (word,
    # position and type embeddings, LayerNorm) when delta is added to its output.
    embeddings = model.hf.bert.embeddings
    weights = [embeddings.word_embeddings.weight] if perturb_at == "word_embeddings" else list(embeddings.parameters())
    term = kl(log_probs(clean_logits).detach(), log_probs(adversarial_logits))
    clean_grad = torch.autograd.grad(result.loss_mlm, weights, retain_graph=True, allow_unused=True)
    term_grad = torch.autograd.grad(term, weights, allow_unused=True, materialize_grads=True)
    flat = [torch.cat([g.flatten() for g in grads if g is not None]) for grads in (clean_grad, term_grad)]
    return *flat, result


@pytest.mark.parametrize("perturb_at", ["embedding_output", "word_embeddings"])
def test_detached_embeddings_get_no_gradient_from_the_adversarial_pass(perturb_at):
    """`embedding_grad: detached` (mt-dnn's pretraining plugin adds its noise to
    ``embed.data.detach()``): the adversarial pass sends nothing to the embedding layer, the
    clean loss does; with `full` (the default, as the fine-tuning code) both do."""
    clean_grad, term_grad, result = adversarial_pass_gradients("detached", perturb_at)
    assert clean_grad.abs().sum() > 0
    assert torch.count_nonzero(term_grad) == 0
    assert result.loss_adv > 0 and not result.skipped
    _, full_term_grad, full = adversarial_pass_gradients("full", perturb_at)
    assert full_term_grad.abs().sum() > 0
    assert full.loss_adv == result.loss_adv  # the same forward values: only the gradient differs


# 7. No masked tokens


def test_mlm_loss_without_masked_tokens_is_zero_and_backward_works():
    weight = torch.randn(4, VOCAB, requires_grad=True)
    logits = torch.zeros(0, 4) @ weight
    loss = mlm_loss(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_mlm_loss_is_the_mean_cross_entropy():
    logits, labels = P, torch.tensor([0, 1])
    expected = -(P.log_softmax(-1)[0, 0] + P.log_softmax(-1)[1, 1]) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_step_without_masked_tokens_runs():
    ids, _, _ = batch()
    closures = Closures(tiny_bert(), ids, torch.zeros_like(ids, dtype=torch.bool))
    result = compute_losses(
        closures.forward, closures.ascent_forward, torch.zeros(0, dtype=torch.long), config=ALUM, step=0
    )
    assert result.loss.item() == 0.0 and result.loss_adv == 0.0 and not result.skipped
    result.loss.backward()


# 8. Validation


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"method": "sgd"}, "method"),
        ({"norm": "l1"}, "norm"),
        ({"perturb_at": "logits"}, "perturb_at"),
        ({"steps": 0}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"start_step": -1}, "start_step"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-5}, "eps"),
        ({"step_size": float("nan")}, "step_size"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"grad_eps": 0.0}, "grad_eps"),
        ({"update": "sgd"}, "update"),
        ({"scale": "percent"}, "scale"),
        ({"kl_grad": "half"}, "kl_grad"),
        ({"on_vanish": "ignore"}, "on_vanish"),
        ({"vanish_steps": 0}, "vanish_steps"),
        ({"vanish_ratio": -1.0}, "vanish_ratio"),
        ({"embedding_grad": "none"}, "embedding_grad"),
        ({"dropout": "off"}, "dropout"),
        ({"method": "fgm", "embedding_grad": "detached"}, "embedding_grad"),
    ],
)
def test_building_a_bad_config_names_the_field(changes, key):
    """The field's own name only: the config loader puts `adversarial.` in front."""
    with pytest.raises(ValueError, match=rf"^{key}: "):
        replace(ALUM, **changes)


def test_the_defaults_and_paper_values_build():
    AdversarialConfig()
    replace(ALUM, eps=1e-5, norm="l2", perturb_at="word_embeddings", steps=3, alpha=1)
    replace(ALUM, update="official", scale="absolute", kl_grad="full", on_vanish="error", vanish_steps=1)


def test_a_config_file_saying_update_paper_still_loads(tmp_path):
    config = load_config(minimal(tmp_path, adversarial={"method": "alum", "update": "paper"}))
    assert config.adversarial.update == "normalised"


def test_the_message_lists_the_choices():
    with pytest.raises(ValueError, match=r"^norm: expected linf or l2, got 'l1'$"):
        replace(ALUM, norm="l1")


# 9. Logged sizes count real tokens only


def test_logged_norms_average_over_real_tokens_only():
    ids, mask, labels = batch()
    real_tokens = torch.ones_like(ids, dtype=torch.bool)
    real_tokens[1, 8:] = False  # the tail of the second sequence is padding
    closures = Closures(tiny_bert(), ids, mask)
    torch.manual_seed(7)
    result = compute_losses(
        closures.forward, closures.ascent_forward, labels, config=ALUM, step=0, real_tokens=real_tokens
    )
    (delta,) = closures.deltas
    per_token = token_norm(delta, ALUM.norm)
    assert result.delta_norm.item() == pytest.approx(per_token[real_tokens].mean().item(), rel=1e-6)
    assert result.delta_norm.item() != pytest.approx(per_token.mean().item(), rel=1e-3)
