"""SMART (Jiang et al. 2020): ALUM's smoothness term plus a Bregman proximal point term that
keeps the model close to a momentum (EMA) teacher of itself.

    loss      = L_clean + alpha * SKL(f(x; theta), f(x + delta; theta))      (ALUM's term, pipeline.methods.alum)
              + mu * SKL(f(x; theta_teacher), f(x; theta))                   (the proximal term)
    after each optimizer step:  theta_teacher <- beta * theta_teacher + (1 - beta) * theta

SKL is the symmetric KL. The teacher is constant in the loss (no gradient reaches it); the
proximal term's gradient goes through both directions of the student's side. Defaults
follow the paper: mu = 1 (``adversarial.mu``), beta = 0.99 (``adversarial.teacher_momentum``);
alpha and the perturbation are ALUM's (the paper's lambda_s and its ascent are ALUM's). The
ascent climbs KL(p || q); mt-dnn's ``SmartPerturbation`` climbs ``stable_kl``, a log-odds
divergence (docs/ALUM.md), which this project does not implement.

The teacher sees the clean pass's dropout masks (`pipeline.methods.objective.Replay`) and computes
in the student's dtype, so the term is exactly 0 while teacher and student are equal: a
float32 teacher beside a bf16 student would round differently and, on a GPU, run other
attention kernels, whose dropout masks differ. Its EMA weights are a float32 copy of the
model on every rank, not sharded (plus a copy in the compute dtype under bf16 or fp16): no
communication in its forward, and under ZeRO-3 each update gathers the student's
parameters once. Its state is
saved with the checkpoints, so a resumed run continues with the same teacher, and, being
replicated, it moves to any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipeline.methods.alum import alum_losses
from pipeline.methods.method import Method
from pipeline.methods.objective import CleanPass, StepLosses, guarded, log_probs, symmetric_kl_of

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig


class Teacher:
    """The EMA teacher of a student module (a `MaskedLM` or a fine-tuning `Classifier`), and
    a `pipeline.methods.companion`: kept beside the model, updated after each optimizer step."""

    CLIENT_KEY = "teacher"

    def __init__(self, student: nn.Module, momentum: float = 0.99):
        self.ema = copy.deepcopy(student).float().requires_grad_(False)  # the EMA weights, float32
        self.module = self.ema  # what runs: the EMA weights in the student's compute dtype (`to`)
        self.momentum = momentum

    def to(self, device, dtype: torch.dtype = torch.float32) -> Teacher:
        """Onto the student's device, computing in its dtype (the engine's): under bf16 or fp16 the
        teacher's forward runs a copy of the float32 EMA weights cast as DeepSpeed casts the
        student (parameters only; floating buffers stay float32)."""
        self.ema.to(device)
        self.module = self.ema
        if dtype != torch.float32:
            self.module = copy.deepcopy(self.ema)
            for param in self.module.parameters():
                param.data = param.data.to(dtype)
        return self

    def start(self, student: nn.Module) -> None:
        """A run that does not resume starts from a copy of the student as loaded."""
        self.update(student, momentum=0.0)

    def after_step(self, student: nn.Module, lr: float) -> None:
        self.update(student, self.momentum)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """theta_teacher <- momentum * theta_teacher + (1 - momentum) * theta (momentum 0: a copy)."""
        params = list(student.parameters())
        with _gathered(params):
            for mine, theirs in zip(self.ema.parameters(), params, strict=True):
                mine.lerp_(theirs.detach().to(mine.dtype), 1.0 - momentum)
        self._cast()

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.ema.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.ema.load_state_dict(state)
        self._cast()

    @torch.no_grad()
    def _cast(self) -> None:
        """The running copy follows the EMA weights (nothing to do when it is them)."""
        if self.module is not self.ema:
            for running, ema in zip(self.module.parameters(), self.ema.parameters(), strict=True):
                running.copy_(ema)


def _gathered(params: Iterable[nn.Parameter]):
    """ZeRO-3 keeps a shard of each parameter per rank: gather them for the update."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only a ZeRO-3 engine's parameters have ds_id: DeepSpeed is in use

    return deepspeed.zero.GatheredParameters(params)


def with_proximal(
    out: StepLosses, clean: CleanPass, teacher_forward: Callable[[], Tensor], config: AdversarialConfig
) -> StepLosses:
    """ALUM's `out` plus mu times the proximal term, the teacher run with the clean pass's dropout masks."""
    clean.replay.again()
    with torch.no_grad():
        teacher_logits = teacher_forward()
    clean.replay.finish()
    target = log_probs(teacher_logits)
    proximal, _ = guarded(
        lambda student: symmetric_kl_of(target, log_probs(student), "full"),
        clean.logits,
        torch.ones((), dtype=torch.bool),
    )
    return dataclasses.replace(out, loss=out.loss + config.mu * proximal)


class Smart(Method):
    """``smart``: ALUM's term plus the proximal term towards its EMA `Teacher`, its companion."""

    name = "smart"
    detachable = True
    keeps_state = True

    def companion(self, model, hf_model, weight_decay, grad_clip) -> Teacher:
        """A copy of the model, taken before ZeRO-3 shards it."""
        return Teacher(model, self.config.teacher_momentum)

    def objective_args(self, companion, module_forward) -> dict:
        return {"teacher": companion and (lambda: module_forward(companion.module))}

    def losses(self, clean, forward, ascent_forward, labels, teacher) -> StepLosses:
        if teacher is None:
            raise ValueError("adversarial.method=smart needs the teacher's forward (pipeline.methods.smart.Teacher)")
        return with_proximal(alum_losses(clean, forward, ascent_forward, self.config), clean, teacher, self.config)
