"""`from pipeline.adversarial import ...`, the import path examples written before the layers
used: an alias of pipeline.methods.adversarial (the same module object, so every name resolves)."""

import sys

from pipeline.methods import adversarial as _module

sys.modules[__name__] = _module
