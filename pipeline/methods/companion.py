"""What a method keeps beside the model from step to step: SMART's EMA teacher
(`pipeline.methods.smart.Teacher`) or ASA's adversaries (`pipeline.methods.asa.AttentionAdversaries`).

Both are replicated on every rank, outside the DeepSpeed engine (so the model's ZeRO
partitions, checkpoints and exports are those of the plain model), and share one protocol:

- ``CLIENT_KEY``: where `state_dict()` goes in a checkpoint's client state, and
  `load_state_dict` reads it back on resume (`pipeline.train.resume`);
- ``start(student)``: the state of a run that does not resume;
- ``after_step(student, lr)``: after each optimizer step, at the model's learning rate;
- ``to(device, dtype)``: onto the engine's device, for a model computing in ``dtype``.
"""

from __future__ import annotations

from torch import nn

from pipeline.methods.asa import AttentionAdversaries
from pipeline.methods.smart import Teacher

Companion = Teacher | AttentionAdversaries


def companion_for(
    adversarial, model: nn.Module, hf_model: nn.Module, weight_decay: float, grad_clip: float
) -> Companion | None:
    """The companion ``adversarial.method`` needs, made before ZeRO-3 shards the model (the
    teacher copies it; the adversaries hook into its attention), or None."""
    if adversarial.method == "smart":
        return Teacher(model, adversarial.teacher_momentum)
    if adversarial.method == "asa":
        return AttentionAdversaries(hf_model, adversarial.asa, weight_decay, grad_clip)
    return None


def teacher_and_adversaries(companion: Companion | None) -> tuple[Teacher | None, AttentionAdversaries | None]:
    """(SMART's teacher, ASA's adversaries): what `pipeline.methods.adversarial.objective` takes, each or None."""
    return (
        companion if isinstance(companion, Teacher) else None,
        companion if isinstance(companion, AttentionAdversaries) else None,
    )
