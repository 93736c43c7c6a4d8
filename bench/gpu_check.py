"""The Python side of bench/gpu_check.sh: the in-process SMART check, the fine-tuning task,
and the report of every check from the runs' files.

    python bench/gpu_check.py smart OUT.json          # SMART under bf16 on this machine's device
    python bench/gpu_check.py task CORPUS.jsonl DIR    # a small classification task from the corpus
    python bench/gpu_check.py report WORK              # one line per check; exit 1 if any failed
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


def smart(out: Path) -> None:
    """A bf16 student and its teacher, equal: the proximal term must be exactly 0 on this
    device's attention kernels and dropout, as it is on the CPU (tests/unit/methods/test_smart.py)."""
    from transformers import BertConfig, BertForMaskedLM

    from pipeline.methods.adversarial import AdversarialConfig, compute_losses
    from pipeline.methods.smart import Teacher
    from pipeline.model.masked_lm import MaskedLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
    )
    student = MaskedLM(BertForMaskedLM(config)).to(device).train()
    teacher = Teacher(student)
    student.to(torch.bfloat16)
    teacher.to(device, torch.bfloat16).start(student)
    ids = torch.randint(5, 8000, (16, 128), device=device)
    index = torch.arange(0, ids.numel(), 7, device=device)
    mask = torch.ones_like(ids)

    def losses(method: str, teacher_module) -> torch.Tensor:
        torch.manual_seed(1)
        return compute_losses(
            lambda d: student(ids, mask, index, d),
            lambda d: student(ids, mask, index, d)[0],
            ids.flatten()[index],
            config=AdversarialConfig(method=method),
            step=0,
            teacher=lambda: teacher_module(ids, mask, index)[0],
        ).loss

    alum = losses("alum", teacher.module)
    proximal = (losses("smart", teacher.module) - alum).item()
    float32_teacher = (
        losses("smart", teacher.ema) - alum
    ).item()  # what ran before: a float32 teacher beside the bf16 student
    ok = proximal == 0.0
    line = (
        f"SMART, bf16 student = teacher on {device.type}: proximal term {proximal:.3g} (a float32 teacher: "
        f"{float32_teacher:.3g}): {'OK' if ok else 'FAILED'}"
    )
    out.write_text(json.dumps({"line": line, "ok": ok}))


def task(corpus: Path, out: Path) -> None:
    """Docstrings labelled by whether they mention "return": 256 to train on, 64 to evaluate."""
    texts = [json.loads(line)["text"][:400] for line in corpus.read_text().splitlines()[:320]]
    rows = [json.dumps({"text": t, "label": int("return" in t.lower())}) + "\n" for t in texts]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(rows[:256]))
    (out / "dev.jsonl").write_text("".join(rows[256:]))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def alum_steps(work: Path, name: str, precision: str, key: str, what: str) -> tuple[str, bool] | None:
    """An ALUM pretraining run's check: `key` positive at every ALUM step, the guard silent."""
    if not (work / name).is_dir():
        return None
    active = [r for r in records(work / name) if r["train/adv_active"]]
    guard = "numerically zero" in (work / f"{name}.log").read_text()
    ok = len(active) == 4 and all(r[key] > 0 for r in active) and not guard
    values = [r[key] for r in active]
    return (
        f"tiny model, {precision} ALUM: {len(active)} ALUM steps, {what} from {min(values):.2e} to {max(values):.2e}, "
        f"guard {'fired' if guard else 'silent'}: {'OK' if ok else 'FAILED'}"
    ), ok


def finetuned(work: Path) -> tuple[str, bool]:
    from safetensors.torch import load_file

    seed = work / "finetune" / "seed-1"
    result = json.loads((seed / "result.json").read_text())
    dtypes = {str(t.dtype).removeprefix("torch.") for t in load_file(seed / "model.safetensors").values()}
    ok = dtypes == {"float32"} and json.loads((seed / "config.json").read_text())["dtype"] == "float32"
    return (
        f"alum finetune --deepspeed, {result['steps']} steps: dev accuracy {result['dev_accuracy']:.3f}, "
        f"saved weights {', '.join(sorted(dtypes))}: {'OK' if ok else 'FAILED'}"
    ), ok


def timing(work: Path) -> str:
    """Step times of the size run (bert-base on a GPU, else the tiny bf16 run)."""
    run = work / ("bert-base" if (work / "bert-base").is_dir() else "tiny-bf16")
    rows = records(run)
    config = json.loads((run / "model" / "config.json").read_text())
    start = next(r["step"] for r in rows if r["train/adv_active"])
    standard = [r for r in rows if 3 <= r["step"] < start]  # after two warm-up steps of each kind
    alum = [r for r in rows if r["step"] >= start + 2]
    seq_len = json.loads((work / "shards" / "manifest.json").read_text())["seq_len"]
    batch = round(standard[0]["perf/tokens_per_s"] * standard[0]["perf/step_seconds"] / seq_len)

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    def mfu(rows):
        if all("perf/mfu" in r for r in rows):
            return f", MFU {median(rows, 'perf/mfu'):.1%}"
        return ", no MFU (no peak in pipeline/train/flops.py)" if run.name == "bert-base" else ""

    return (
        f"hidden {config['hidden_size']} x {config['num_hidden_layers']} layers, batch {batch} x {seq_len}: "
        f"standard {median(standard, 'perf/step_seconds'):.3f} s/step ({median(standard, 'perf/tokens_per_s'):,.0f} "
        "tok/s"
        f"{mfu(standard)}); ALUM {median(alum, 'perf/step_seconds'):.3f} s/step "
        f"({median(alum, 'perf/tokens_per_s'):,.0f} tok/s"
        f"{mfu(alum)}); ALUM/standard step time "
        f"{median(alum, 'perf/step_seconds') / median(standard, 'perf/step_seconds'):.2f}"
    )


def report(work: Path) -> int:
    smart_check = json.loads((work / "smart.json").read_text())
    checks = [
        alum_steps(work, "tiny-bf16", "bf16", "train/loss_adv", "loss_adv"),
        (smart_check["line"], smart_check["ok"]),
        alum_steps(work, "tiny-fp16", "fp16", "train/adv_grad_norm", "ascent gradient norm"),
        finetuned(work),
    ]
    for check in checks:
        print(
            f"gpu_check: {check[0]}"
            if check
            else "gpu_check: tiny model, fp16 ALUM: skipped (no CUDA; a CPU has no fp16)"
        )
    if not (work / "bert-base").is_dir():
        print("gpu_check: bert-base: skipped (no CUDA); the timing below is the tiny bf16 run's")
    print(f"gpu_check: {timing(work)}")
    return 0 if all(check[1] for check in checks if check) else 1


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "smart":
        smart(Path(args[0]))
    elif command == "task":
        task(Path(args[0]), Path(args[1]))
    else:
        sys.exit(report(Path(args[0])))
