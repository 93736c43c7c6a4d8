"""`from pipeline.hf_trainer import ...`, the import path examples written before the layers
used: an alias of pipeline.tasks.hf_trainer (the same module object, so every name resolves)."""

import sys

from pipeline.tasks import hf_trainer as _module

sys.modules[__name__] = _module
