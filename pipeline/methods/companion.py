"""What a method keeps beside the model from step to step: SMART's EMA teacher
(`pipeline.methods.smart.Teacher`) or ASA's adversaries (`pipeline.methods.asa.AttentionAdversaries`),
each made by its method (`pipeline.methods.method.Method.companion`).

Both are replicated on every rank, outside the DeepSpeed engine (so the model's ZeRO
partitions, checkpoints and exports are those of the plain model), and share one protocol:

- ``CLIENT_KEY``: where `state_dict()` goes in a checkpoint's client state, and
  `load_state_dict` reads it back on resume (`pipeline.train.resume`);
- ``start(student)``: the state of a run that does not resume;
- ``after_step(student, lr)``: after each optimizer step, at the model's learning rate;
- ``to(device, dtype)``: onto the engine's device, for a model computing in ``dtype``.
"""

from __future__ import annotations

from pipeline.methods.asa import AttentionAdversaries
from pipeline.methods.smart import Teacher

Companion = Teacher | AttentionAdversaries
