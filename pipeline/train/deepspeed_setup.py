"""The pieces handed to `deepspeed.initialize`: its config, the optimizer, the LR schedule.

Batch sizes, clipping and precision come from `train.*` and are written into the DeepSpeed
config, so the JSON files in configs/deepspeed/ only say how to shard and offload (ZeRO
stage, offload devices, bucket sizes). Precision `auto` is bf16 where the accelerator
supports it and fp32 on CPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_prep.errors import UserError

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.train.config import TrainConfig


def deepspeed_config(source: str | dict, train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON (a file or a mapping) that `source` names, with the batch sizes, clipping and
    precision of `train` written in: pretraining passes its run config's, fine-tuning its own."""
    ds = _load(source)
    for key in (
        "optimizer",
        "scheduler",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
    ):
        if key in ds:
            raise UserError(f"deepspeed: remove {key!r}; it comes from the train section of the run config")
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size {train.global_batch_size} is not divisible by train.micro_batch_size "
            f"{train.micro_batch_size} x world size {world_size}"
        )
    precision = resolved_precision(train.precision)
    ds.update(
        train_batch_size=train.global_batch_size,
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.global_batch_size // per_step,
        gradient_clipping=train.grad_clip,
        steps_per_print=10**9,
        bf16={"enabled": precision == "bf16"},
        fp16={"enabled": precision == "fp16"},
    )
    return ds


def resolved_precision(precision: str) -> str:
    """`train.precision` as this machine computes in it (bf16, fp16 or fp32): what DeepSpeed is
    configured with, and the peak perf/mfu is measured against. `auto` is bf16 where the
    accelerator computes in it natively, else fp32. A precision the accelerator lacks (fp16 on most CPUs)
    is refused here, before set-up, rather than by DeepSpeed's engine, which asks the same
    accelerator and stops in a traceback once the model is built."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if precision == "auto":
        return "bf16" if accelerator.device_name() != "cpu" and _native_bf16(accelerator) else "fp32"
    # DeepSpeed's own test (DeepSpeedEngine._do_sanity_check); its CPU accelerator answers None for fp16 without
    # oneDNN's.
    has = {"bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported(), "fp32": True}
    if not has[precision]:
        supported = " or ".join(p for p, yes in has.items() if yes)
        raise UserError(
            f"train.precision={precision}: this machine's accelerator ({accelerator.device_name()}) "
            f"does not support {precision}; use {supported}"
        )
    return precision


def _native_bf16(accelerator) -> bool:
    """Whether the accelerator computes in bf16 itself. DeepSpeed's CUDA accelerator asks
    torch.cuda.is_bf16_supported(), which also says yes where bf16 is only emulated (V100, T4:
    compute capability below 8, no bf16 tensor cores); `auto` means fp32 there, as on a CPU."""
    if accelerator.device_name() == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return accelerator.is_bf16_supported()


def _load(source) -> dict:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"deepspeed: {path}: no such DeepSpeed config file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed: {path}: not valid JSON ({e})") from None


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def make_optimizer(model: torch.nn.Module, train: TrainConfig, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms: torch's own, which needs no build (on a
    GPU it picks its foreach implementation itself; DeepSpeed's FusedAdam would compile a CUDA
    op on first use, which a pip-installed torch has no compiler for). DeepSpeed's CPU Adam
    when offloading the optimizer. A checkpoint written with FusedAdam loads into it: same
    state names, its integer step turned into a tensor by torch's AdamW, decoupled decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": train.lr, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps}
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to `train.lr`, then linear decay to `lr * min_lr_ratio` at `decay_steps`
    (default `max_steps`), constant after it. With `decay_steps` set, raising `max_steps` on
    resume extends the run without moving the schedule."""
    horizon = train.decay_steps or train.max_steps

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        remaining = max(1, horizon - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / remaining)
        return 1.0 - (1.0 - train.min_lr_ratio) * progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compute_dtype(engine: DeepSpeedEngine) -> torch.dtype:
    """The dtype the engine's module computes in (DeepSpeed casts it for bf16 and fp16)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def full_fp32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of an engine's `module`, whole and in fp32 on the CPU: the optimizer's
    master copy where DeepSpeed keeps one (bf16/fp16, any ZeRO stage; partitioned over the
    ranks, so every rank must call this), else the parameter itself."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (param.detach() if full is None else full).float().cpu()
    return state
