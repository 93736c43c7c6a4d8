"""The guard against an adversarial term that is numerically zero.

An ALUM step costs several standard steps. If delta is below the embeddings' rounding
step (bf16 keeps 8 significant bits) or the ascent never moves it, the adversarial logits
equal the clean ones and the term is zero: the job pays for nothing. The trainer logs
``train/adv_ratio`` (alpha * L_adv / L_mlm, over all ranks) and ``train/delta_lost``. An active
step counts as vanished when its ratio is below ``adversarial.vanish_ratio``, or when at least
half of delta's elements were lost to rounding (what is left of the term is then rounding
noise, no larger than a random perturbation's). After ``adversarial.vanish_steps`` such
active steps in a row the run says so once, in one line naming the keys to change, or stops
with exit code 2 (``adversarial.on_vanish: error``).

The default floor, 1e-5, lies between what the official magnitudes and this project's
defaults give (the study in docs/ALUM.md has the measurements).
"""

from __future__ import annotations

from typing import Callable

from data_prep.errors import UserError
from pipeline.methods.adversarial import AdversarialConfig

LOST_LIMIT = 0.5


def vanished(config: AdversarialConfig, ratio: float, lost: float) -> bool:
    """Whether an active step's adversarial term counts as numerically zero."""
    return not ratio >= config.vanish_ratio or lost >= LOST_LIMIT


def message(config: AdversarialConfig, step: int, ratio: float, lost: float) -> str:
    """The one line a user reads: what was measured, and which changes to the config may help
    (only changes: a key already at the suggested setting is not named)."""
    if lost >= LOST_LIMIT:
        cause = f"{lost:.1%} of delta's elements vanish when added to the embeddings (below their precision)"
        changes = ["raise adversarial.noise_std and adversarial.step_size"]
    else:
        cause = "the perturbation barely changes the predictions"
        changes = ["raise adversarial.step_size or adversarial.noise_std", "lower adversarial.grad_eps"]
    if config.scale != "relative":
        changes.append("use adversarial.scale=relative")
    return (
        f"step {step}: the adversarial term has been numerically zero for {config.vanish_steps} active steps in a row "
        f"(alpha * L_adv / L_mlm = {ratio:.2e}, adversarial.vanish_ratio {config.vanish_ratio:g}); {cause}: "
        f"{', or '.join(changes)}"
    )


def check(
    config: AdversarialConfig, *, streak: int, step: int, ratio: float, lost: float, announce: Callable[[str], None]
) -> None:
    """Act once a streak reaches vanish_steps: `announce` the line, or stop with it (exit 2)."""
    if streak != config.vanish_steps:
        return
    line = message(config, step, ratio, lost)
    if config.on_vanish == "error":
        raise UserError(f"{line} (adversarial.on_vanish=error)")
    announce(f"warning: {line} (adversarial.on_vanish=error stops the run instead)")
