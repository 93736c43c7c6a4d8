"""What a method keeps beside the model from step to step: SMART's EMA teacher
(`pipeline.methods.smart.Teacher`) or ASA's adversaries (`pipeline.methods.asa.AttentionAdversaries`),
each made by its method (`pipeline.methods.method.Method.companion`).

Both are replicated on every rank, outside the DeepSpeed engine (so the model's ZeRO
partitions, checkpoints and exports are those of the plain model), and share one protocol:

- the checkpointed state's (`pipeline.train.checkpoint.CheckpointedState`): ``CLIENT_KEY``,
  ``state_dict``/``load_state_dict``, and ``start(student)`` for a run that does not resume;
- ``after_step(student, lr)``: after each optimizer step, at the model's learning rate;
- ``to(device, dtype)``: onto the engine's device, for a model computing in ``dtype``.
"""

from __future__ import annotations

from pipeline.methods.asa import AttentionAdversaries
from pipeline.methods.smart import Teacher

Companion = Teacher | AttentionAdversaries
