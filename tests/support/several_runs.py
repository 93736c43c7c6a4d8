"""Several pretraining runs, one after another, in one launch of the same ranks:

    deepspeed --num_gpus 2 --module several_runs ARGS [--next ARGS ...]

each ARGS being `pipeline.train.pretrain`'s. Tests of many short runs (one per adversarial method,
a run and its resumption) pay the launch, the imports and the process group once instead
of once per run; every run still builds its own engine, reads its own checkpoints and
writes its own run directory through `pipeline.train.pretrain.train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.train.distributed import exit_process, shutdown_distributed
from pipeline.train.pretrain import parse_args, train


def main(argv: list[str]) -> int:
    runs, current = [], []
    for arg in argv:
        if arg == "--next":
            runs.append(current)
            current = []
        elif not arg.startswith("--local_rank"):
            current.append(arg)
    runs.append(current)
    try:
        for run in runs:
            args = parse_args(run)
            train(args.config, Path(args.run_dir), args.overrides)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
