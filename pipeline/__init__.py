"""Pretraining: configuration, data loading and masking, the ALUM objective, training, export."""

import logging


def _drop_deepspeed_accelerator_notice() -> None:
    """`import deepspeed` logs "Setting accelerator to CPU ..." in every process without a GPU,
    `--help` included. Training says which device it runs on in its own first line instead."""
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: not record.getMessage().startswith("Setting accelerator to CPU")
    )


_drop_deepspeed_accelerator_notice()
