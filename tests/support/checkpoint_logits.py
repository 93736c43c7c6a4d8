"""Test helper, run under the DeepSpeed launcher: the training model's logits at a checkpoint.

Builds the engine exactly as training does (`pipeline.train.pretrain.prepare`, the run's stored
config), loads a checkpoint (TAG "start": none, the weights training starts from), and has
rank 0 save the masked-position logits of a fixed batch, so a test can compare them with a
Hugging Face model's (the export, or the model a run continued from).

    deepspeed --num_gpus 2 --module checkpoint_logits RUN_DIR TAG OUT.pt
"""

import sys
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    run_dir, tag, out = Path(sys.argv[-3]), sys.argv[-2], Path(sys.argv[-1])
    from pipeline.data.batches import masked_batch
    from pipeline.train import checkpoint
    from pipeline.train.pretrain import prepare

    run = prepare(None, run_dir, [], finished_ok=True)
    if tag != "start":
        checkpoint.load(run.engine, run_dir, tag)
    batch = masked_batch(run.dataset, np.arange(4), step=0, seed=123, rate=0.15, vocab=run.vocab)
    run.engine.eval()
    with torch.no_grad():
        logits, _ = run.engine.module(batch.input_ids, batch.attention_mask, batch.masked_index)
    if torch.distributed.get_rank() == 0:
        torch.save(
            {
                "logits": logits,
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "masked": batch.masked,
            },
            out,
        )


if __name__ == "__main__":
    main()
