"""Can this design see ALUM's effect? The study of docs/results/study-plan.md, in one resumable
command (the plan was committed before any of its runs).

    python bench/claims.py                 # the study (about 100 minutes on a 2-core machine; sizes from PILOT)
    python bench/claims.py --work /tmp/c --pretrain-steps 20 --finetune-steps 10 \\
        --subset-epochs 1 --pretrain-seeds 1,2 --finetune-seeds 1,2 --eval-batches 2 --out /tmp/c/out
                                           # a smoke run
    python bench/claims.py --render        # table, figure and README summary again, from the JSON

Every stage runs the project's own commands as a user would (`python -m pipeline.pretrain`,
`alum export`, `alum eval`, `alum finetune`) in --work, and is skipped when its output is
there, so a re-run continues where the last one stopped. Stages run on --workers processes
at once, one thread each (a 64-wide model uses a second thread poorly).

Per pretraining seed (model initialisation and data order), on WikiText-2 train:
- `standard`: S steps of standard MLM (batch 32 x 128, the mask curriculum); its step-S/2
  checkpoint is the shared phase every branch below starts from (weights, optimizer,
  schedule, data position), so branches see identical data;
- `alum`: steps S/2 to S with ALUM (alpha 10, its default perturbation);
- `noise`: the same with `adversarial.update: random`: ALUM's passes and per-token size, a
  random direction (the control separating "adversarial" from "perturbed");
- `standard-compute`: standard MLM from scratch for S/2 + 3 x S/2 steps, ALUM's compute
  by counted passes (an ALUM step is three forward and three backward passes, a standard
  one one of each);
- `random-init`: the seed's initial weights, untrained (a 1-step run at learning rate 0),
  the floor pretraining should lift.
Each model: `alum eval` on WikiText-2's test split and Tiny Shakespeare (never seen by the
tokenizer or the model): clean loss, PGD with a random start (10 steps, radii 0.03, 0.1,
0.3) and random noise of the same norm, 10% token substitution. Then `alum finetune` with
the standard objective and with ALUM (alpha 1), fine-tuning seeds shared across models, on
full SST-2 (F steps) and on a fixed 2,000-sentence subset; per run the SST-2 dev accuracy
and the predictions on AdvGLUE-SST2 and on its matched dev sources (bench/claims_stats.py).

OUT/claims.json holds every run's figures, each stage's wall time and the total; the
analysis, OUT/claims.md, OUT/claims.png and the README's summary are made from it alone
(bench/claims_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from claims_report import BRANCHES, FT_DATA, FT_METHODS, MODELS, render
from claims_stats import match_pairs
from data_dir import data_dir

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
# The documents holding a summary block, and whether theirs is the brief one.
SUMMARIZED_IN = {REPO / "README.md": True, REPO / "docs" / "benchmarks.md": False}
ALUM_PASS_RATIO = 3  # ALUM: clean F+B, noise F + ascent B, adversarial F+B; standard: one F+B
EVAL_SETS = {"wikitext-test": "shards-wikitext-test", "shakespeare": "shards-shakespeare"}
# The timing pilot that fixed the sizes (one thread per process, two processes at once, this
# 2-core machine, 2026-12-07): seconds per pretraining step and fine-tuning steps per second.
PILOT = {"standard_step_s": 0.130, "alum_step_s": 0.398, "finetune_standard_steps_per_s": 25.8,
         "finetune_alum_steps_per_s": 10.9}  # fmt: skip
BRANCH_OVERRIDES = {
    "alum": ("adversarial.method=alum",),
    "noise": ("adversarial.method=alum", "adversarial.update=random"),
}


class Stages:
    """Runs the project's commands, records each one's wall time in WORK/wall-seconds.json
    (kept across invocations, so a resumed study reports what it cost in all)."""

    def __init__(self, work: Path, threads: int):
        self.work, self.threads, self.lock = work, threads, threading.Lock()
        self.times_path = work / "wall-seconds.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}

    def log(self, what: str) -> Path:
        return self.work / "logs" / f"{what.replace('/', '_').replace(' ', '_')}.log"

    def run(self, what: str, *args: str) -> None:
        started = time.perf_counter()
        sys.stdout.write(f"[claims] {what}\n")  # one write: two workers' lines stay apart
        sys.stdout.flush()
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "OMP_NUM_THREADS": str(self.threads)}
        log = self.log(what)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise SystemExit(f"claims: {what} failed (exit {result.returncode}, log {log}); fix it and re-run")
        with self.lock:
            self.times[what] = self.times.get(what, 0.0) + time.perf_counter() - started
            self.times_path.write_text(json.dumps(self.times, indent=1) + "\n")


def prepare_data(stages: Stages) -> None:
    """The tokenizer on WikiText-2 train alone; shards of train (2% val for training-time
    validation only), of WikiText-2 test and of Tiny Shakespeare (all rows in `train`)."""
    work, data = stages.work, data_dir()
    train = str(data / "wikitext-2" / "train.txt")
    if not (work / "tokenizer" / "alum_tokenizer.json").is_file():
        stages.run("tokenizer", "-m", "pipeline.cli", "tokenizer", "--input", train, "--vocab-size", "8000",
                   "--out", str(work / "tokenizer"))  # fmt: skip
    sources = {
        "shards": (train, "0.02"),
        EVAL_SETS["wikitext-test"]: (str(data / "wikitext-2" / "test.txt"), "0"),
        EVAL_SETS["shakespeare"]: (str(data / "tinyshakespeare" / "input.txt"), "0"),
    }
    for name, (text, val) in sources.items():
        if not (work / name / "manifest.json").is_file():
            stages.run(f"shard {name}", "-m", "pipeline.cli", "shard", "--input", text,
                       "--tokenizer", str(work / "tokenizer"), "--seq-len", "128", "--val-fraction", val,
                       "--out", str(work / name))  # fmt: skip


def pretrain(stages: Stages, seed: int, name: str, steps: int, *overrides: str) -> None:
    run_dir = stages.work / "pretrain" / f"s{seed}" / name
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file() and latest.read_text().strip() == f"step{steps:08d}":
        return
    work = stages.work
    stages.run(
        f"pretrain s{seed}/{name}",
        "-m", "pipeline.pretrain", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
        f"data.shards={work / 'shards'}", f"data.tokenizer={work / 'tokenizer'}",
        "deepspeed=configs/deepspeed/zero0.json", f"train.max_steps={steps}", f"train.seed={seed}",
        "train.global_batch_size=32", "train.micro_batch_size=32", "train.lr=2e-3", "train.warmup_steps=100",
        "train.threads_per_rank=1", "train.log_every=25", f"eval.every_steps={max(1, steps // 10)}",
        "eval.batches=8", f"checkpoint.every_steps={max(1, steps // 2)}", "checkpoint.keep_last=2",
        "wandb.mode=disabled", "adversarial.method=none", *overrides,
    )  # fmt: skip


def pretrain_seed(stages: Stages, seed: int, steps: int, branch: str) -> None:
    """One model of a pretraining seed; the branches wait for nothing but `standard`'s
    step-S/2 checkpoint, which the caller has run first."""
    half = steps // 2
    shared = stages.work / "pretrain" / f"s{seed}" / "standard" / "checkpoints" / f"step{half:08d}"
    if branch == "standard":
        pretrain(stages, seed, branch, steps)
    elif branch == "standard-compute":
        pretrain(stages, seed, branch, half + ALUM_PASS_RATIO * half)
    elif branch == "random-init":
        pretrain(stages, seed, branch, 1, "train.lr=0", "train.warmup_steps=0", "eval.every_steps=1000")
    else:
        pretrain(stages, seed, branch, steps, f"checkpoint.init_from={shared}", "checkpoint.init_optimizer=true",
                 f"adversarial.start_step={half}", *BRANCH_OVERRIDES[branch])  # fmt: skip


def export_and_eval(stages: Stages, seed: int, name: str, batches: int) -> Path:
    model = stages.work / "models" / f"s{seed}" / name
    if not (model / "config.json").is_file():
        stages.run(f"export s{seed}/{name}", "-m", "pipeline.cli", "export", "--run-dir",
                   str(stages.work / "pretrain" / f"s{seed}" / name), "--out", str(model))  # fmt: skip
    if not (model / "eval-heldout.json").is_file():
        sets = [f"{key}={stages.work / value}" for key, value in EVAL_SETS.items()]
        stages.run(f"eval s{seed}/{name}", "-m", "pipeline.cli", "eval", "--model", str(model), "--shards", *sets,
                   "--split", "train", "--batches", str(batches), "--radius", "0.03", "0.1", "0.3",
                   "--pgd-steps", "10", "--pgd-start", "random", "--substitution-rate", "0.1",
                   "--out", str(model / "eval-heldout.json"))  # fmt: skip
    return model


def finetune(stages: Stages, seed: int, name: str, data: str, method: str, args) -> None:
    out = stages.work / "finetune" / f"s{seed}" / name / f"{data}-{method}"
    done = out / "results.json"
    if done.is_file() and [s["seed"] for s in json.loads(done.read_text())["seeds"]] == args.ft_seeds:
        return
    size = ["--max-steps", str(args.finetune_steps)] if data == "full" else \
        ["--train-subset", str(args.subset), "--epochs", str(args.subset_epochs)]  # fmt: skip
    shared = data_dir()
    stages.run(f"finetune s{seed}/{name}/{data}-{method}", "-m", "pipeline.cli", "finetune",
               "--model", str(stages.work / "models" / f"s{seed}" / name), "--task", "sst2",
               "--data", str(shared / "sst2"), "--advglue", str(shared / "advglue" / "dev.json"),
               "--out", str(out), "--method", method, "--seeds", ",".join(map(str, args.ft_seeds)),
               *size, "--eval-every", "100000", "--lr", "5e-4")  # fmt: skip


def model_chain(stages: Stages, seed: int, name: str, args) -> None:
    pretrain_seed(stages, seed, args.pretrain_steps, name)
    export_and_eval(stages, seed, name, args.eval_batches)


def run_all(stages: Stages, args) -> None:
    """Every stage on a pool of --workers: each seed's `standard` run first (the branches
    start from it), then the other models, then every fine-tuning run."""
    with ThreadPoolExecutor(args.workers) as pool:
        firsts = [pool.submit(model_chain, stages, s, "standard", args) for s in args.pre_seeds]
        rest = [pool.submit(model_chain, stages, s, "standard-compute", args) for s in args.pre_seeds]
        for future in firsts:
            future.result()
        rest += [pool.submit(model_chain, stages, s, m, args) for s in args.pre_seeds for m in MODELS
                 if m not in ("standard", "standard-compute")]  # fmt: skip
        for future in rest:
            future.result()
        jobs = [pool.submit(finetune, stages, s, m, d, f, args)
                for f in FT_METHODS for d in FT_DATA for s in args.pre_seeds for m in MODELS]  # fmt: skip
        for future in jobs:
            future.result()


def collect(stages: Stages, args) -> dict:
    """The study's JSON: setup, the AdvGLUE matching, every model's evaluation and every
    fine-tuning run's accuracy and matched predictions, wall times."""
    from pipeline.data.glue import load_task

    task = load_task("sst2", data_dir() / "sst2", data_dir() / "advglue" / "dev.json")
    pairs = match_pairs([(e.text, e.label) for e in task.adversarial], [(e.text, e.label) for e in task.dev])
    labels = [str(task.adversarial[a].label) for a, _ in pairs]  # a pair's two sentences share it
    work, models, finetunes = stages.work, {}, {}
    for s in args.pre_seeds:
        for m in MODELS:
            models[f"s{s}/{m}"] = json.loads((work / "models" / f"s{s}" / m / "eval-heldout.json").read_text())
            for d in FT_DATA:
                for f in FT_METHODS:
                    results = json.loads((work / "finetune" / f"s{s}" / m / f"{d}-{f}" / "results.json").read_text())
                    finetunes[f"s{s}/{m}/{d}-{f}"] = [run_record(r, pairs, labels) for r in results["seeds"]]
    setup = {
        "plan": "docs/results/study-plan.md",
        "pretrain_seeds": args.pre_seeds,
        "finetune_seeds": args.ft_seeds,
        "pretrain_steps": args.pretrain_steps,
        "standard_compute_steps": args.pretrain_steps // 2 * (1 + ALUM_PASS_RATIO),
        "alum_pass_ratio": ALUM_PASS_RATIO,
        "finetune_steps": args.finetune_steps,
        "subset": args.subset,
        "subset_epochs": args.subset_epochs,
        "eval_batches": args.eval_batches,
        "workers": args.workers,
        "pilot": PILOT,
        "branches": list(BRANCHES),
        "advglue_sentences": len(task.adversarial),
        "advglue_matched": len(pairs),
        "wall_seconds": stages.times,
        "stage_seconds": sum(stages.times.values()),
        "elapsed_seconds": elapsed(stages),
    }
    return {"setup": setup, "models": models, "finetune": finetunes, "terms": terms(work, args.pre_seeds)}


def terms(work: Path, seeds: list[int]) -> dict:
    """How large the perturbed branches' term was: per seed, the mean over their logged ALUM
    steps of train/adv_ratio (alpha x L_adv / L_mlm) and train/loss_adv; a null result reads
    differently when the term was negligible."""
    out = {}
    for branch in BRANCH_OVERRIDES:
        for s in seeds:
            lines = (work / "pretrain" / f"s{s}" / branch / "metrics.jsonl").read_text().splitlines()
            records = [r for r in map(json.loads, filter(None, lines)) if r.get("train/adv_active") == 1]
            out[f"s{s}/{branch}"] = {
                key: sum(r[f"train/{key}"] for r in records) / len(records) for key in ("adv_ratio", "loss_adv")
            }
    return out


def elapsed(stages: Stages) -> float:
    """The study's wall time: the union of its stages' intervals, each ending when its log was
    last written and lasting its recorded time. With several workers the stages overlap, so
    this is less than their sum; the machine's idle time between invocations is not in it."""
    intervals = []
    for what, seconds in stages.times.items():
        log = stages.log(what)
        if log.is_file():
            intervals.append((log.stat().st_mtime - seconds, log.stat().st_mtime))
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def run_record(result: dict, pairs: list[tuple[int, int]], labels: list[str]) -> dict:
    """A fine-tuning seed's dev accuracy and its correctness (1/0) on the matched AdvGLUE
    sentences and on their dev sources, as strings in pair order."""
    pred = result["predictions"]
    return {
        "seed": result["seed"],
        "dev_accuracy": result["dev_accuracy"],
        "advglue_accuracy": result["advglue_accuracy"],
        "perturbed_predictions": "".join(str(int(pred["advglue"][a] == y)) for (a, _), y in zip(pairs, labels)),
        "original_predictions": "".join(str(int(pred["dev"][d] == y)) for (_, d), y in zip(pairs, labels)),
    }


def documents(out: Path) -> dict[Path, bool]:
    """The documents whose summary block a study in `out` rewrites: the README's and the
    benchmarks page's for the committed study, none for a smoke run elsewhere."""
    return SUMMARIZED_IN if out.resolve() == OUT else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "claims")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--pretrain-steps", type=int, default=1600, help="S: the standard run's steps")
    parser.add_argument("--finetune-steps", type=int, default=400, help="F: full-SST-2 fine-tuning steps")
    parser.add_argument("--subset", type=int, default=2000, help="sentences of the SST-2 training subset")
    parser.add_argument("--subset-epochs", type=int, default=3)
    parser.add_argument("--pretrain-seeds", default="1,2,3")
    parser.add_argument("--finetune-seeds", default="1,2,3,4,5")
    parser.add_argument("--eval-batches", type=int, default=16, help="alum eval batches (x32 rows) per held-out set")
    parser.add_argument("--workers", type=int, default=2, help="commands run at once, one thread each")
    parser.add_argument("--render", action="store_true", help="only the report again, from OUT/claims.json")
    args = parser.parse_args()
    if args.render:
        render(json.loads((args.out / "claims.json").read_text()), args.out, documents(args.out))
        return
    args.pre_seeds = [int(s) for s in args.pretrain_seeds.split(",")]
    args.ft_seeds = [int(s) for s in args.finetune_seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.work, threads=1)
    prepare_data(stages)
    run_all(stages, args)
    study = collect(stages, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "claims.json").write_text(json.dumps(study, indent=1) + "\n")
    first = args.work / "pretrain" / f"s{args.pre_seeds[0]}"
    stages.run("pretraining curves", "-m", "pipeline.tasks.plot",
               *[x for m in BRANCHES for x in ("--run-dir", str(first / m))], "--labels", ",".join(BRANCHES),
               "--out", str(args.out / "pretraining.png"))  # fmt: skip
    render(study, args.out, documents(args.out))


if __name__ == "__main__":
    main()
