"""Metrics: `metrics.jsonl` in the run directory and the same keys in W&B, from rank 0.

On resume the log is cut back to the checkpoint's step before anything new is written, so
a resumed run's `metrics.jsonl` reads exactly like an uninterrupted run's. The W&B run id
is kept in the checkpoint, so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep import atomic
from data_prep.errors import UserError
from pipeline.data.sampling import sample_digest
from pipeline.methods.registry import method_of

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from pipeline.train.config import RunConfig

METRICS = "metrics.jsonl"


class MetricsLogger:
    """Writes a step's record when it is due (every train.log_every steps and the last), on
    rank 0 only; the other ranks' logger does nothing."""

    def __init__(self, run_dir: Path, config: RunConfig, resume_from, enabled: bool):
        """`config`: the RunConfig; `resume_from`: the TrainState the run continues from."""
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.every, self.max_steps = config.train.log_every, config.train.max_steps
        self.run = None
        self.wandb_id = resume_from.wandb_id
        if not enabled:
            return
        self._truncate(resume_from.step)
        if config.wandb.mode != "disabled":
            self.run = _start_wandb(run_dir, config.wandb, self.wandb_id, dataclasses.asdict(config))
            self.wandb_id = self.run.id

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def _truncate(self, resume_step: int) -> None:
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if (record := _parse(line)) and record["step"] <= resume_step
        ]
        atomic.write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)
            except (
                OSError
            ) as e:  # its service was killed: a Ctrl-C to DeepSpeed's launcher SIGTERMs rank 0's whole tree
                print(
                    f"{self.path.parent / 'wandb'}: W&B's service ended ({e.strerror or e}); from step {step} the "
                    "metrics are in "
                    f"{self.path} only",
                    file=sys.stderr,
                    flush=True,
                )
                self.run = None

    def close(self) -> None:
        """Finish the W&B run and say where it is (W&B's own 30-line summary is off: the metrics
        are in metrics.jsonl and `alum plot`). On a full disk W&B cannot flush its own log file when it closes
        it (an OSError out of `finish`): that is said in one line, so that it does not replace
        the error the run stopped with (a checkpoint that could not be saved)."""
        if self.run is None:
            return
        where = (
            self.run.url
            if not self.run.offline
            else f"offline, `wandb sync {self.run.dir.removesuffix('/files')}` uploads it"
        )
        try:
            self.run.finish()
        except OSError as e:
            print(
                f"{self.path.parent / 'wandb'}: W&B could not finish writing its files ({e.strerror or e})",
                file=sys.stderr,
                flush=True,
            )
            return
        print(f"wandb: run {self.run.id} ({where})", flush=True)


def step_record(stats, *, state, batch, mask_rate: float, adversarial, engine: DeepSpeedEngine, companion=None) -> dict:
    """The train/* and data/* keys of a logged step, from its `pipeline.train.step.StepStats`, its
    `pipeline.data.batches.StepBatches` and the run's counters after it, plus the method's own
    numbers (`Method.stat_names`: ASA's asa/*)."""
    record = {
        "train/loss": stats.loss,
        "train/loss_mlm": stats.loss_mlm,
        "train/loss_adv": stats.loss_adv,
        "train/mask_rate": mask_rate,
        "train/lr": engine.get_lr()[0],
        "train/grad_norm": _grad_norm(engine),
        "train/adv_active": int(adversarial.active(state.step - 1)),
        "train/adv_skipped": state.adv_skipped,
        "train/delta_norm": stats.delta_norm,
        "train/adv_grad_norm": stats.adv_grad_norm,
        "train/adv_ratio": stats.adv_ratio(adversarial.alpha),
        "train/delta_lost": stats.delta_lost,
        "train/nonfinite_steps": state.bad_streak,
        "data/consumed_samples": state.consumed_samples,
        "data/epoch": state.consumed_samples // batch.dataset_size,
        "data/sample_digest": sample_digest(batch.global_indices),
    }
    if stats.extras:
        record.update(zip(method_of(adversarial).stat_names(companion), stats.extras))
    if stats.adv_grad_norm > 0:
        # Its size is often 1e-8 or less, which W&B's summary and tables print as 0.0.
        record["train/adv_grad_norm_log10"] = math.log10(stats.adv_grad_norm)
    return record


def _grad_norm(engine: DeepSpeedEngine) -> float:
    """The global gradient norm DeepSpeed computed for clipping; NaN where it keeps none (ZeRO-0)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)


def check_wandb_login(settings) -> None:
    """An online run needs an API key: find out before the model and engine are built
    (minutes on a large model), not when the first metrics are logged."""
    if settings.mode != "online":
        return
    import wandb

    if not wandb.login(verify=False, prompt=False):
        raise UserError(
            "wandb.mode=online but no W&B API key is configured: run `wandb login`, set WANDB_API_KEY, "
            "or train with wandb.mode=offline and upload later with `wandb sync`"
        )


def _start_wandb(run_dir: Path, settings, wandb_id: str | None, config: dict):
    """The W&B run (the same one again on resume). Online with no server reachable within
    `init_timeout_s` (compute nodes often have no internet): per `fallback`, log offline
    under the same run id, so `wandb sync` later fills in the intended run, or stop."""
    import wandb

    run_id = wandb_id or secrets.token_hex(4)  # chosen here so that an offline fallback keeps it

    def start(mode: str):
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name,
            mode=mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config,
            settings=wandb.Settings(init_timeout=settings.init_timeout_s, quiet=True),
        )

    if settings.mode != "online":
        return start(settings.mode)
    try:
        return start("online")
    except wandb.Error as e:
        reason = str(e).strip().splitlines()[0]
        wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
        if settings.fallback == "error":
            raise UserError(
                f"wandb: no W&B server within wandb.init_timeout_s={settings.init_timeout_s:g} s ({reason}); "
                "set wandb.mode=offline, or wandb.fallback=offline to log locally when it is unreachable"
            ) from None
    print(
        f"wandb: no W&B server within {settings.init_timeout_s:g} s ({reason}); logging offline as run {run_id}: "
        f"`wandb sync {run_dir / 'wandb'}/offline-run-*` uploads it later",
        file=sys.stderr,
        flush=True,
    )
    return start("offline")


def _plain(value):
    """JSON has no NaN/inf: write them as strings so a diverging run still logs."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _parse(line: str) -> dict | None:
    """A logged record; None for an empty line or one cut short by a kill during the write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
