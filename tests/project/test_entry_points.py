"""The names users were given before pipeline/ was layered keep working: the entry-point
modules forward to their homes, and the documented import paths are the moved modules."""

from __future__ import annotations

import sys

from helpers import run_python


def test_the_old_import_paths_are_the_moved_modules():
    import pipeline.adversarial
    import pipeline.hf_trainer
    from pipeline.adversarial import AdversarialConfig, compute_losses
    from pipeline.methods import adversarial
    from pipeline.tasks import hf_trainer

    assert pipeline.adversarial is adversarial and pipeline.hf_trainer is hf_trainer
    assert AdversarialConfig is adversarial.AdversarialConfig and compute_losses is adversarial.compute_losses
    assert pipeline.hf_trainer.AdversarialTrainer is hf_trainer.AdversarialTrainer


def test_the_supervisor_runs_under_its_documented_module_name():
    result = run_python("-m", "pipeline.supervise", "--", sys.executable, "-c", "raise SystemExit(0)", timeout=120)
    assert result.returncode == 0, result.stderr
