"""ASA's parts on a tiny real BERT (dropout on, padded batch): the straight-through mask, the
gradient reversal, the attention bias, the loss and the adversaries' own update."""

from __future__ import annotations

import pytest
import torch
from test_adversarial import MASK_ID, VOCAB, tiny_bert
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from data_prep.errors import UserError
from pipeline.methods.adversarial import AdversarialConfig, objective, run_objective
from pipeline.methods.asa import Adversary, AsaConfig, AttentionAdversaries, GradientReversal, StraightThroughMask
from pipeline.model.masked_lm import MaskedLM

ASA = AdversarialConfig(method="asa", alpha=1.0)


def padded_batch():
    """Two sequences, the second with 4 padding tokens; 3 masked positions in each."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 12), generator=generator)
    real_tokens = torch.ones_like(ids)
    real_tokens[1, 8:] = 0
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, [2, 5, 7]] = True
    labels = ids[masked]
    return ids.masked_fill(masked, MASK_ID), real_tokens, masked.flatten().nonzero().squeeze(1), labels


def attacked(asa: AsaConfig = AsaConfig(), seed: int = 3):
    """(MaskedLM of the tiny BERT with adversaries attached, the adversaries)."""
    model = MaskedLM(tiny_bert())
    torch.manual_seed(seed)
    return model, AttentionAdversaries(model.hf, asa)


def step_losses(model, adversaries, config=ASA, seed=7):
    ids, real_tokens, index, labels = padded_batch()
    torch.manual_seed(seed)
    losses = objective(
        lambda d: model(ids, real_tokens, index, d),
        lambda d: model(ids, real_tokens, index, d)[0],
        labels,
        config=config,
        step=0,
        real_tokens=real_tokens,
        adversaries=adversaries,
    )
    yielded = []
    out = run_objective(losses, lambda loss: (yielded.append(loss.detach()), loss.backward()))
    return out, yielded[0]


def test_the_straight_through_mask_thresholds_forward_and_has_the_sigmoid_gradient():
    scores = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], requires_grad=True)
    mask = StraightThroughMask.apply(scores)
    assert mask.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (mask * weights).sum().backward()
    reference = scores.detach().clone().requires_grad_(True)
    (torch.sigmoid(reference) * weights).sum().backward()
    torch.testing.assert_close(scores.grad, reference.grad, rtol=0, atol=0)


def test_the_gradient_reversal_flips_the_adversarys_gradient_exactly():
    torch.manual_seed(0)
    adversary = Adversary(8)
    hidden, real_tokens = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    weights = torch.randn(2, 5, 5)
    (adversary(hidden, real_tokens) * weights).sum().backward()
    reversed_grads = [p.grad.clone() for p in adversary.parameters()]
    adversary.zero_grad()
    scores = adversary.query(hidden) @ adversary.key(hidden).transpose(-1, -2) / 8**0.5
    (StraightThroughMask.apply(scores) * weights).sum().backward()  # the same without the reversal
    assert any(g.abs().sum() > 0 for g in reversed_grads)
    for flipped, plain in zip(reversed_grads, (p.grad for p in adversary.parameters())):
        assert torch.equal(flipped, -plain)
    x = torch.randn(3, requires_grad=True)
    GradientReversal.apply(x).sum().backward()
    assert torch.equal(x.grad, -torch.ones(3))


def keep_everything(adversaries: AttentionAdversaries) -> None:
    """Scores = b_q . b_k / sqrt(H) > 0 for every pair: the masks keep every real unit."""
    with torch.no_grad():
        for adversary in adversaries.adversaries:
            for linear in (adversary.query, adversary.key):
                linear.weight.zero_()
                linear.bias.fill_(1.0)


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_masks_that_keep_every_unit_give_the_clean_pass_exactly(padded):
    """Under one SDPA kernel. By default PyTorch runs the attacked pass, whose mask carries a
    gradient (the adversaries'), on another kernel than the clean pass's plain SDPA call (no
    mask at all without padding), which differs in the last bits (here by under 1e-7)."""
    model, adversaries = attacked()
    keep_everything(adversaries)
    ids, real_tokens, index, _ = padded_batch()
    attention = real_tokens if padded else None
    real_tokens = real_tokens if padded else torch.ones_like(real_tokens)
    model.eval()
    clean, _ = model(ids, attention, index)
    with adversaries.active(real_tokens):
        kept, _ = model(ids, attention, index)
    torch.testing.assert_close(clean, kept, rtol=0, atol=1e-6)
    with sdpa_kernel(SDPBackend.MATH):
        clean, _ = model(ids, attention, index)
        with adversaries.active(real_tokens):
            kept, _ = model(ids, attention, index)
    assert torch.equal(clean, kept)
    assert adversaries.masked_fractions(real_tokens).tolist() == [0.0, 0.0]


class SdpaMasks(TorchFunctionMode):
    """The mask each call of torch's scaled_dot_product_attention gets (None: none)."""

    def __init__(self):
        super().__init__()
        self.masks: list[torch.Tensor | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_outside_an_attack_asa_runs_the_models_plain_sdpa(padded):
    """No zeros mask in the standard phase or a clean pass: without padding SDPA gets no mask
    at all (the flash kernel on a GPU), and the logits are those of the same model with
    ``sdpa``, bit for bit, in eval and in training mode (the same dropout)."""
    model, _ = attacked()
    plain = MaskedLM(tiny_bert())
    assert model.hf.config._attn_implementation == "asa_sdpa" and plain.hf.config._attn_implementation == "sdpa"
    ids, real_tokens, index, _ = padded_batch()
    attention = real_tokens if padded else None
    for mode in ("eval", "train"):
        runs = []
        for lm in (model, plain):
            getattr(lm, mode)()
            torch.manual_seed(5)
            with SdpaMasks() as seen:
                logits, _ = lm(ids, attention, index)
            runs.append((logits, seen.masks))
        (asa_logits, asa_masks), (plain_logits, plain_masks) = runs
        assert torch.equal(asa_logits, plain_logits)
        assert len(asa_masks) == len(plain_masks) == 2
        if padded:
            assert all(torch.equal(a, p) for a, p in zip(asa_masks, plain_masks))
        else:
            assert asa_masks == plain_masks == [None, None]


def test_a_random_adversary_masks_some_units_and_changes_the_prediction():
    model, adversaries = attacked()
    ids, real_tokens, index, _ = padded_batch()
    model.eval()
    clean, _ = model(ids, real_tokens, index)
    with adversaries.active(real_tokens):
        masked, _ = model(ids, real_tokens, index)
    fractions = adversaries.masked_fractions(real_tokens)
    assert ((fractions > 0.05) & (fractions < 0.95)).all(), fractions
    assert (masked - clean).abs().max() > 1e-3
    assert set(adversaries.masks[0].unique().tolist()) == {0.0, 1.0}
    assert adversaries.masks[0][1, :, 8:].sum() == 0  # padding keys are never kept


def test_the_loss_adds_the_kl_and_a_penalty_only_the_adversaries_feel():
    model, adversaries = attacked()
    out, yielded = step_losses(model, adversaries)
    kept = sum(m.sum() for m in adversaries.masks.values()) / 2
    assert out.loss_adv > 0 and torch.isfinite(out.loss_adv)
    torch.testing.assert_close(out.loss, out.loss_mlm + ASA.alpha * out.loss_adv)
    torch.testing.assert_close(yielded, out.loss + 0.25 * kept.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.extras[0], 0.25 * kept.detach())
    model_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    adversary_grads = [p.grad.clone() for p in adversaries.adversaries.parameters()]
    assert all(g.abs().sum() > 0 for g in adversary_grads)

    # tau = 0: the same masks (they do not depend on tau), the same model gradient, another adversary gradient
    free = AdversarialConfig(method="asa", alpha=1.0, asa=AsaConfig(tau=0.0))
    model, adversaries = attacked()
    out0, yielded0 = step_losses(model, adversaries, free)
    torch.testing.assert_close(out0.loss, out.loss, rtol=0, atol=0)
    for a, b in zip(model_grads, (p.grad for p in model.parameters() if p.grad is not None)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(a, p.grad) for a, p in zip(adversary_grads, adversaries.adversaries.parameters()))


def test_the_adversaries_take_adamw_steps_and_their_state_round_trips():
    model, adversaries = attacked()
    before = [p.clone() for p in adversaries.adversaries.parameters()]
    adversaries.after_step(model, lr=1e-3)  # no gradient yet (before ASA starts): nothing moves
    assert all(torch.equal(a, p) for a, p in zip(before, adversaries.adversaries.parameters()))
    step_losses(model, adversaries)
    adversaries.after_step(model, lr=1e-3)
    assert adversaries.grad_norm > 0
    assert all(p.grad is None for p in adversaries.adversaries.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, adversaries.adversaries.parameters()))
    _, copy = attacked(seed=11)
    copy.load_state_dict(adversaries.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(adversaries.adversaries.parameters(), copy.adversaries.parameters()))
    assert copy.optimizer.state_dict()["state"][0]["step"] == 1


def test_the_sampled_variant_draws_a_new_mask_each_pass():
    model, adversaries = attacked(AsaConfig(gumbel=True))
    ids, real_tokens, index, _ = padded_batch()
    draws = []
    for _ in range(2):
        adversaries.draw_noise(real_tokens.bool())
        with adversaries.active(real_tokens):
            model(ids, real_tokens, index)
        draws.append(adversaries.masks[1].clone())
    assert not torch.equal(draws[0], draws[1])
    assert set(draws[0].unique().tolist()) == {0.0, 1.0}


def test_only_the_chosen_layers_are_attacked():
    model, adversaries = attacked(AsaConfig(layers="1"))
    step_losses(model, adversaries)
    assert list(adversaries.masks) == [1] and len(adversaries.adversaries) == 1
    assert adversaries.stat_names() == ["asa/penalty", "asa/masked_fraction/layer1", "asa/grad_norm"]


@pytest.mark.parametrize(
    "layers, message", [("0,x", "layers: expected all or layer indices"), ("1,1", "distinct"), (-1, ">= 0")]
)
def test_bad_layer_lists_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        AsaConfig(layers=layers)


def test_a_layer_the_model_lacks_is_refused():
    with pytest.raises(UserError, match=r"adversarial.asa.layers: layer 2 does not exist \(the model has 2 layers"):
        attacked(AsaConfig(layers="0,2"))
