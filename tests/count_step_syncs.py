"""Host syncs of real ALUM training steps on a one-rank DeepSpeed engine (CPU), as JSON.

    python tests/count_step_syncs.py RUN_DIR OUT.json key=value ...

Builds the engine as `alum pretrain` does (`pipeline.pretrain.prepare`), then runs
`train_step` and `StepStats.gather` for a few steps under `host_syncs.HostSyncs`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from host_syncs import HostSyncs

PIPELINE = str(Path(__file__).resolve().parents[1] / "pipeline")


def main() -> None:
    from pipeline.data import Batches
    from pipeline.distributed import shutdown_distributed
    from pipeline.pretrain import prepare
    from pipeline.step import StepStats, train_step

    run_dir, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    run = prepare("tiny", run_dir, overrides)
    train = run.config.train
    batches = Batches(run.dataset, run.vocab, train.global_batch_size, train.micro_batch_size, train.seed)
    counter = HostSyncs()
    with counter:
        for step in range(train.max_steps):
            micro_batches = batches.for_step(step, step * train.global_batch_size, 0.15).micro_batches
            stats = StepStats.gather(train_step(run.engine, micro_batches, run.config.adversarial, step), stop=False)
    shutdown_distributed()
    out.write_text(json.dumps({
        "steps": train.max_steps, "micro_batches": len(micro_batches), "loss_adv": stats.loss_adv,
        "pipeline_syncs": counter.from_files(PIPELINE), "all_syncs": len(counter.syncs),
        "pipeline_read_backs": [where for where in counter.read_backs if where.startswith(PIPELINE)],
    }))


if __name__ == "__main__":
    main()
