"""SMART: the EMA teacher's update rule and the proximal term, on a tiny real BERT with dropout on."""

from __future__ import annotations

import torch
from test_adversarial import Closures, batch, tiny_bert

from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.methods.smart import Teacher

SMART = AdversarialConfig(method="smart", start_step=0)
ALUM = AdversarialConfig(method="alum", start_step=0)


def losses(config, student, teacher_model, seed=7):
    ids, mask, labels = batch()
    closures = Closures(student, ids, mask)
    teacher_closures = Closures(teacher_model, ids, mask)
    torch.manual_seed(seed)
    return compute_losses(
        closures.forward,
        closures.ascent_forward,
        labels,
        config=config,
        step=0,
        teacher=lambda: teacher_closures.forward(None)[0],
    )


def test_the_teacher_follows_the_ema_rule():
    student = tiny_bert()
    teacher = Teacher(student)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student, momentum=0.9)
    for old, new, s in zip(before, teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s, rtol=1e-6, atol=1e-7)
        assert not new.requires_grad and new.dtype == torch.float32
    teacher.update(student, momentum=0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.module.parameters(), student.parameters()))


def test_the_proximal_term_is_zero_while_the_teacher_equals_the_student():
    student = tiny_bert()
    smart = losses(SMART, student, Teacher(student).module)
    alum = losses(ALUM, student, Teacher(student).module)
    assert torch.equal(smart.loss, alum.loss) and smart.loss_adv > 0  # same dropout masks, so SKL(p, p) = 0 exactly


def test_the_proximal_term_pulls_towards_a_different_teacher():
    student, other = tiny_bert(), tiny_bert()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    smart = losses(SMART, student, other)
    alum = losses(ALUM, student, other)
    assert smart.loss > alum.loss
    doubled = losses(AdversarialConfig(method="smart", start_step=0, mu=2.0), student, other)
    torch.testing.assert_close(doubled.loss - alum.loss, 2 * (smart.loss - alum.loss), rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(smart.loss - alum.loss, [next(student.parameters())])
    assert grad.abs().sum() > 0  # the term trains the student; the teacher has no gradient


def test_teacher_state_round_trips():
    student = tiny_bert()
    teacher = Teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    teacher.update(student, momentum=0.5)
    copy = Teacher(tiny_bert())
    assert not all(
        torch.equal(a, b) for a, b in zip(copy.module.state_dict().values(), teacher.module.state_dict().values())
    )
    copy.load_state_dict(teacher.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(copy.module.state_dict().values(), teacher.module.state_dict().values())
    )


def test_a_bf16_students_teacher_computes_in_bf16_so_the_proximal_term_is_exactly_zero():
    """As under DeepSpeed bf16: the teacher is copied from the float32 student, then the engine
    casts the student to bf16 and the run starts the teacher from it."""
    student = tiny_bert()
    teacher = Teacher(student)
    student.to(torch.bfloat16)
    teacher.to("cpu", torch.bfloat16).start(student)
    assert all(p.dtype == torch.float32 for p in teacher.ema.parameters())  # the EMA keeps float32 weights
    smart, alum = losses(SMART, student, teacher.module), losses(ALUM, student, teacher.module)
    assert torch.equal(smart.loss, alum.loss) and smart.loss_adv > 0
    # A float32 teacher with the same weights (what ran before) measures rounding, not distance.
    assert losses(SMART, student, teacher.ema).loss > alum.loss


def test_a_bf16_teacher_follows_its_float32_ema():
    student = tiny_bert()
    teacher = Teacher(student).to("cpu", torch.bfloat16)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # below bf16's resolution for most weights: only a float32 EMA keeps it
    teacher.update(student, momentum=0.5)
    for ema, running, s in zip(teacher.ema.parameters(), teacher.module.parameters(), student.parameters()):
        assert ema.dtype == torch.float32 and running.dtype == torch.bfloat16
        assert torch.equal(running, ema.to(torch.bfloat16))
    restored = Teacher(tiny_bert()).to("cpu", torch.bfloat16)
    restored.load_state_dict(teacher.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.module.parameters(), teacher.module.parameters()))
