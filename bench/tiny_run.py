"""The tiny training run that the tests and bench/fault_injection.py launch: its data, its
settings and its command line, in one place so that the bench rehearses the run the tests check.

A few seconds per launch on 2 CPU cores: tiny BERT, a 2000-token vocabulary, 64-token rows of
WikiText-2, 16 samples a step. bench/ scripts import it by name (Python puts a script's folder
on sys.path); tests/helpers.py puts bench/ there for the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep.corpus import ReadOptions
from data_prep.inputs import expand_inputs
from data_prep.shard import ShardSettings, shard_corpus
from data_prep.tokenizer import train_tokenizer

CONFIG = "configs/tiny.yaml"
TRAIN_OVERRIDES = (
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.warmup_steps=2",
    "eval.batches=4",  # 16 validation rows in all, on any number of ranks
    "wandb.mode=offline",
    "adversarial.grad_eps=1e-12",
    "train.dist_timeout_s=300",  # a launch that hangs on a collective fails in minutes
)
# 8 steps, ALUM from step 4, a checkpoint and an evaluation every 4 steps. The perturbation is
# large enough that the adversarial term is well above float32 rounding of the loss.
RUN = (
    "train.max_steps=8",
    "adversarial.method=alum",
    "adversarial.start_step=4",
    "adversarial.step_size=0.1",
    "adversarial.noise_std=0.01",
    "checkpoint.every_steps=4",
    "eval.every_steps=4",
    "train.peak_tflops=0.5",
)  # a CPU has no known peak: this one logs perf/mfu


def build_tokenizer(text: Path, out: Path) -> Path:
    """A BERT-style BPE tokenizer with a 2000-token vocabulary, trained on `text` (WikiText-2 train)."""
    train_tokenizer(expand_inputs([str(text)]), ReadOptions(), out, vocab_size=2000, threads=2)
    return out


def build_shards(text: Path, tokenizer: Path, out: Path) -> Path:
    """`text` (WikiText-2 valid) packed into 64-token rows, 10% of documents in the val split."""
    shard_corpus([str(text)], tokenizer, out, settings=ShardSettings(seq_len=64, val_fraction=0.1))
    return out


def pretrain_args(
    run_dir: Path, shards: Path, tokenizer: Path | None, *overrides: str, stage: int = 2, config: str = CONFIG
) -> list[str]:
    """`pipeline.train.pretrain`'s arguments: TRAIN_OVERRIDES, then `overrides` (of the same key, the
    later wins). No tokenizer: the run's default (model.init_from's)."""
    return [
        "--config",
        config,
        "--run-dir",
        str(run_dir),
        f"data.shards={shards}",
        *([f"data.tokenizer={tokenizer}"] if tokenizer else []),
        f"deepspeed=configs/deepspeed/zero{stage}.json",
        *TRAIN_OVERRIDES,
        *overrides,
    ]


def launch_command(launcher: str, world: int, port: int, module: str = "pipeline.pretrain") -> list[str]:
    """The command before pretrain_args, as users start training: `deepspeed`, `torchrun`,
    `python -m pipeline.pretrain` (one rank) or `alum pretrain` (one rank). `module`: another
    module to launch the same way (a test's helper, `pipeline.finetune`)."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return {
        "deepspeed": [deepspeed, "--num_gpus", str(world), "--master_port", str(port), "--module", module],
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *("--nproc_per_node", str(world)),
            *("--master_port", str(port), "-m", module),
        ],
        "python": [sys.executable, "-m", module],
        "alum": [sys.executable, "-m", "pipeline.cli", "pretrain"],
    }[launcher]


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock figures: what two runs of the same data must share exactly."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]
