"""Every method by its ``adversarial.method`` name: the one place a name is looked up.

A method is a `pipeline.methods.method.Method` subclass in its own file; adding one is that
file and a line here. The order is the one the config's error message, `alum finetune
--method` and bench/bench_methods.py list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.accumulated import FreeLB, Yopo
from pipeline.methods.alum import Alum, AlumAmortized
from pipeline.methods.asa import Asa
from pipeline.methods.fgm import Fgm, Fgsm
from pipeline.methods.freeat import FreeAt
from pipeline.methods.method import Method, Standard
from pipeline.methods.pgd import Pgd
from pipeline.methods.smart import Smart

if TYPE_CHECKING:
    from pipeline.methods.adversarial import AdversarialConfig

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Standard, Alum, AlumAmortized, Smart, Fgsm, Fgm, Pgd, FreeAt, FreeLB, Yopo, Asa)
}
# `alum finetune --method` calls the plain method "standard".
FINETUNE_NAMES = {("standard" if not cls.adversarial else name): name for name, cls in METHODS.items()}


def method_of(config: AdversarialConfig) -> Method:
    """The method an ``adversarial`` config section names, bound to it."""
    return METHODS[config.method](config)
