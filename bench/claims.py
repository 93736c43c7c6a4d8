"""The paper's claims at small scale: does ALUM pretraining (from scratch, and continual) or
ALUM fine-tuning buy generalization or robustness? One command, resumable.

    python bench/claims.py                          # the full experiment (about 1.5 hours here)
    python bench/claims.py --work /tmp/c --pretrain-steps 40 --continual-steps 20 \
        --finetune-steps 20 --seeds 1,2             # a smoke run
    python bench/claims.py --render                 # the table and figure again, from docs/results/claims.json
    python bench/claims.py --only asa               # add ASA's stages to the committed study (about 25 minutes here)

Every stage runs the project's own commands as a user would (`python -m pipeline.pretrain`,
`alum export`, `alum eval`, `alum finetune`) in --work, and is skipped when its output is
already there, so a re-run continues where the last one stopped.

1. Data: a sentencepiece tokenizer and 128-token shards of WikiText-2 train (2% of the
   documents held out as the val split).
2. Pretraining, the tiny BERT of configs/models/tiny.yaml with the mask curriculum, batch 32:
   - `standard`: standard MLM for S steps;
   - `alum`: the paper's two stages: the standard run's step-S/2 checkpoint (weights,
     optimizer, schedule, data position) continued with ALUM to step S (equal steps);
   - `alum-amortized`: the same two stages with amortized ALUM (pipeline/methods/alum.py);
   - `asa`: the same two stages with adversarial self-attention (pipeline/methods/asa.py), its KL
     weighted 1 as in the ASA paper;
   - `standard-compute`: standard MLM from scratch for S/2 + r * S/2 steps, where r is the
     measured time of an ALUM step over a standard one (equal compute);
   - `continual-standard` and `continual-alum`: the `standard` model continued for C more
     steps, a new schedule at a fifth of the learning rate, without and with ALUM.
3. `alum eval` of every model on the held-out split: perplexity, accuracy (beside the
   commonest-token baseline), loss under embedding PGD and token substitution.
4. `alum finetune` of every model on SST-2, standard and ALUM (alpha 1), one run per seed,
   with SST-2 dev and AdvGLUE-SST2 accuracy; the `standard` model also with amortized
   ALUM, SMART, FreeLB and ASA fine-tuning, at their defaults.
5. docs/results/claims.{json,md,png}: the table (mean +- std over seeds; a difference from
   the `standard` model counts only if it exceeds the sum of the two spreads) and a figure;
   docs/results/pretraining.png: the pretraining curves.

`--only NAMES` runs the stages of some two-stage models (TWO_STAGE) and fine-tuning methods
of the `standard` model alone and merges them into the committed OUT/claims.json, the other
entries kept as they are: how a method joins the study without re-running it all. The
`standard` run they start from is trained again if --work lacks it, and must evaluate as
the committed one to 1e-6 (training is deterministic; another version of a library can move
the last bits: 2e-8 of the loss seen here), or nothing is merged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from claims_report import FINETUNE_BOTH, FINETUNE_METHODS, figure, table
from data_dir import data_dir, wikitext_train

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
PRETRAINED = ("standard", "alum", "alum-amortized", "asa", "standard-compute", "continual-standard", "continual-alum")
# The models trained as the paper trains ALUM: the standard run's half-way checkpoint
# continued with the method to the same step; by name, the method and its overrides.
TWO_STAGE = {"alum": ("alum",), "alum-amortized": ("alum_amortized",), "asa": ("asa", "adversarial.alpha=1")}


def command(*args: str, what: str) -> float:
    """Run one of the project's commands from the repository root; its wall time in seconds."""
    started = time.perf_counter()
    print(f"[claims] {what}", flush=True)
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    )
    if result.returncode != 0:
        raise SystemExit(f"claims: {what} failed with exit code {result.returncode}; fix it and re-run to continue")
    return time.perf_counter() - started


def prepare_data(work: Path) -> tuple[Path, Path]:
    tokenizer, shards = work / "tokenizer", work / "shards"
    train = str(wikitext_train())
    if not (tokenizer / "alum_tokenizer.json").is_file():
        command(
            "-m",
            "pipeline.cli",
            "tokenizer",
            "--input",
            train,
            "--vocab-size",
            "8000",
            "--out",
            str(tokenizer),
            what="tokenizer",
        )
    if not (shards / "manifest.json").is_file():
        command(
            "-m",
            "pipeline.cli",
            "shard",
            "--input",
            train,
            "--tokenizer",
            str(tokenizer),
            "--seq-len",
            "128",
            "--val-fraction",
            "0.02",
            "--out",
            str(shards),
            what="shards",
        )
    return tokenizer, shards


def pretrain(work: Path, name: str, steps: int, *overrides: str) -> None:
    """One pretraining run in work/pretrain/NAME (resumes if interrupted, skipped if finished)."""
    run_dir = work / "pretrain" / name
    if finished(run_dir, steps):
        return
    command(
        "-m",
        "pipeline.pretrain",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        f"data.shards={work / 'shards'}",
        f"data.tokenizer={work / 'tokenizer'}",
        "deepspeed=configs/deepspeed/zero0.json",
        f"train.max_steps={steps}",
        "train.global_batch_size=32",
        "train.micro_batch_size=32",
        "train.lr=2e-3",
        "train.warmup_steps=100",
        "train.log_every=50",
        f"eval.every_steps={max(1, steps // 10)}",
        "eval.batches=8",
        f"checkpoint.every_steps={max(1, steps // 2)}",
        "checkpoint.keep_last=2",
        "wandb.mode=disabled",
        "adversarial.method=none",
        *overrides,
        what=f"pretrain {name} ({steps} steps)",
    )


def finished(run_dir: Path, steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step{steps:08d}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_time_ratio(work: Path, name: str, half: int) -> float:
    """Fastest logged step of run `name`'s second half over the fastest standard step: on a
    shared machine other work only ever slows a step, so the minimum is the step's own cost
    (perf/step_seconds is the step alone: validation and checkpoints are timed apart)."""
    standard = [r["perf/step_seconds"] for r in metrics(work / "pretrain" / "standard")]
    adversarial = [r["perf/step_seconds"] for r in metrics(work / "pretrain" / name) if r["step"] > half]
    return min(adversarial) / min(standard)


def pretrain_two_stage(work: Path, name: str, steps: int) -> float:
    """The standard run's step-S/2 checkpoint continued with TWO_STAGE[name] to step S; its step-time ratio."""
    half = steps // 2
    method, *overrides = TWO_STAGE[name]
    pretrain(
        work,
        name,
        steps,
        f"checkpoint.init_from={work / 'pretrain' / 'standard' / 'checkpoints' / f'step{half:08d}'}",
        "checkpoint.init_optimizer=true",
        f"adversarial.method={method}",
        f"adversarial.start_step={half}",
        *overrides,
    )
    return step_time_ratio(work, name, half)


def ratio_key(name: str) -> str:
    return {"alum": "alum_step_time_ratio", "alum-amortized": "amortized_step_time_ratio"}.get(
        name, f"{name}_step_time_ratio"
    )


def pretrain_all(work: Path, steps: int, continual: int) -> dict:
    half = steps // 2
    pretrain(work, "standard", steps)
    ratios = {ratio_key(name): pretrain_two_stage(work, name, steps) for name in TWO_STAGE}
    ratio = ratios["alum_step_time_ratio"]
    compute_steps = half + round(ratio * half)
    pretrain(work, "standard-compute", compute_steps)
    for name, method in (("continual-standard", "none"), ("continual-alum", "alum")):
        pretrain(
            work,
            name,
            continual,
            f"checkpoint.init_from={work / 'pretrain' / 'standard'}",
            "train.lr=4e-4",
            f"adversarial.method={method}",
            "adversarial.start_step=0",
        )
    return {"steps": steps, "continual_steps": continual, "standard_compute_steps": compute_steps, **ratios}


def export_and_eval(work: Path, name: str) -> dict:
    model = work / "models" / name
    if not (model / "config.json").is_file():
        command(
            "-m",
            "pipeline.cli",
            "export",
            "--run-dir",
            str(work / "pretrain" / name),
            "--out",
            str(model),
            what=f"export {name}",
        )
    result = model / "eval-val.json"
    if not result.is_file():
        command(
            "-m",
            "pipeline.cli",
            "eval",
            "--model",
            str(model),
            "--shards",
            str(work / "shards"),
            "--batches",
            "20",
            "--pgd-start=zero",  # the committed study's attack, so that `--only` adds figures alike
            what=f"eval {name}",
        )
    return json.loads(result.read_text())


def finetune(work: Path, name: str, method: str, args) -> dict:
    out = work / "finetune" / f"{name}-{method}"
    expected = {int(s) for s in args.seeds.split(",")}
    done = out / "results.json"
    if not (done.is_file() and {s["seed"] for s in json.loads(done.read_text())["seeds"]} == expected):
        command(
            "-m",
            "pipeline.cli",
            "finetune",
            "--model",
            str(work / "models" / name),
            "--task",
            "sst2",
            "--data",
            str(data_dir() / "sst2"),
            "--advglue",
            str(data_dir() / "advglue" / "dev.json"),
            "--out",
            str(out),
            "--method",
            method,
            "--seeds",
            args.seeds,
            "--max-steps",
            str(args.finetune_steps),
            "--eval-every",
            str(args.finetune_steps),
            "--lr",
            "5e-4",
            what=f"finetune {name} ({method})",
        )
    return json.loads(done.read_text())


def model_entry(work: Path, name: str, methods: tuple[str, ...], args) -> dict:
    """A pretrained model's evaluation and fine-tuning results (and, for ASA, its masked fractions)."""
    entry = {"eval": export_and_eval(work, name), "finetune": {m: finetune(work, name, m, args) for m in methods}}
    fractions = masked_fractions(work, name)  # only an ASA run logs them
    if fractions:
        entry["masked_fraction"] = fractions
    return entry


def wall_times(work: Path, seconds: float) -> list[float]:
    """The wall time of every invocation on this work directory, this one added: a resumed
    experiment reports what it cost in all, not only its last part."""
    path = work / "wall-seconds.json"
    times = [*json.loads(path.read_text()), seconds] if path.is_file() else [seconds]
    path.write_text(json.dumps(times) + "\n")
    return times


def masked_fractions(work: Path, name: str) -> dict[str, list[float]]:
    """An ASA run's logged masked fraction per layer, by step (`asa/masked_fraction/layerN`); {} for other runs."""
    records = [r for r in metrics(work / "pretrain" / name) if "asa/penalty" in r]
    if not records:
        return {}
    prefix = "asa/masked_fraction/"
    layers = sorted(k[len(prefix) :] for k in records[0] if k.startswith(prefix))
    return {"step": [r["step"] for r in records], **{layer: [r[prefix + layer] for r in records] for layer in layers}}


def merged(args, names: list[str]) -> dict:
    """The committed study with the stages of `names` run (or resumed) in --work and put in."""
    study = json.loads((args.out / "claims.json").read_text())
    setup = study["setup"]
    unknown = [n for n in names if n not in TWO_STAGE and n not in FINETUNE_METHODS[1:]]
    if unknown:
        raise SystemExit(
            f"claims: --only {unknown[0]}: neither a two-stage model ({', '.join(TWO_STAGE)}) "
            f"nor a fine-tuning method ({', '.join(FINETUNE_METHODS[1:])})"
        )
    asked = {"steps": args.pretrain_steps, "finetune_steps": args.finetune_steps, "seeds": args.seeds}
    for key, value in asked.items():
        if setup[key] != value:
            raise SystemExit(
                f"claims: --only: {key} is {value!r} here but {setup[key]!r} in {args.out / 'claims.json'}"
            )
    started = time.perf_counter()
    prepare_data(args.work)
    pretrain(args.work, "standard", args.pretrain_steps)
    committed, here = study["models"]["standard"]["eval"]["clean"], export_and_eval(args.work, "standard")["clean"]
    if any(abs(here[key] - value) > 1e-6 * max(1.0, abs(value)) for key, value in committed.items()):
        raise SystemExit(
            f"claims: --only: the standard model in {args.work} evaluates to {here} but the committed one to "
            f"{committed}; run the whole experiment instead"
        )
    for name in names:
        if name in TWO_STAGE:
            setup[ratio_key(name)] = pretrain_two_stage(args.work, name, args.pretrain_steps)
            study["models"][name] = model_entry(args.work, name, FINETUNE_BOTH, args)
        if name in FINETUNE_METHODS:
            study["models"]["standard"]["finetune"][name] = finetune(args.work, "standard", name, args)
    setup.update(
        wall_seconds=setup["wall_seconds"] + time.perf_counter() - started, invocations=setup["invocations"] + 1
    )
    study["models"] = {name: study["models"][name] for name in PRETRAINED if name in study["models"]}
    return study


def write(study: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / "claims.md").write_text(table(study))
    figure(study, out / "claims.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "claims")
    parser.add_argument("--pretrain-steps", type=int, default=2400, help="S: the standard run's steps")
    parser.add_argument("--continual-steps", type=int, default=1200, help="C: continual pretraining steps")
    parser.add_argument("--finetune-steps", type=int, default=500, help="per seed: about a quarter of an SST-2 epoch")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--render", action="store_true", help="only rewrite claims.md and claims.png from OUT/claims.json"
    )
    parser.add_argument(
        "--only",
        help="comma-separated two-stage models and fine-tuning methods to run and merge into OUT/claims.json "
        f"(models: {', '.join(TWO_STAGE)}; methods: {', '.join(FINETUNE_METHODS[1:])})",
    )
    args = parser.parse_args()
    if args.only:
        study = merged(args, args.only.split(","))
        write(study, args.out)
        print(table(study))
        return
    if args.render:
        study = json.loads((args.out / "claims.json").read_text())
        (args.out / "claims.md").write_text(table(study))
        figure(study, args.out / "claims.png")
        print(table(study))
        return
    started = time.perf_counter()
    prepare_data(args.work)
    setup = pretrain_all(args.work, args.pretrain_steps, args.continual_steps)
    models = {}
    for name in PRETRAINED:
        methods = FINETUNE_METHODS if name == "standard" else FINETUNE_BOTH
        models[name] = model_entry(args.work, name, methods, args)
    invocations = wall_times(args.work, time.perf_counter() - started)
    setup.update(
        finetune_steps=args.finetune_steps,
        seeds=args.seeds,
        wall_seconds=sum(invocations),
        invocations=len(invocations),
    )
    study = {"setup": setup, "models": models}
    write(study, args.out)
    command(
        "-m",
        "pipeline.tasks.plot",
        *[x for n in PRETRAINED for x in ("--run-dir", str(args.work / "pretrain" / n))],
        "--labels",
        ",".join(PRETRAINED),
        "--out",
        str(args.out / "pretraining.png"),
        what="pretraining curves",
    )
    print(table(study))


if __name__ == "__main__":
    main()
