#!/usr/bin/env bash
# The GPU check, for the few minutes a GPU is available: under 5 minutes on one GPU.
#
#   bash bench/gpu_check.sh [WORK]     # WORK: where data and runs go (default: a temporary folder, removed)
#
# 1. Data that needs no download: the demo's corpus (Python's docstrings), a tokenizer, 128-token shards.
# 2. A bf16 ALUM run of the tiny model: every ALUM step has loss_adv > 0 and the vanishing guard stays silent.
# 3. The shipped bert-base config at its defaults on one GPU (batch 32 x 128 tokens): 8 standard steps, then
#    8 ALUM steps; prints tokens/s, perf/mfu and the ALUM/standard step-time ratio (medians after 2 warm-up steps).
#    perf/mfu needs the GPU's exact name in pipeline/flops.py (or train.peak_tflops); without it the line says so.
# Without CUDA there is no bert-base run (it would take too long on a CPU): tokens/s and the ratio come from
# the tiny bf16 run, and the checks are the same, so the script is tested on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
WORK="${1:-}"
if [[ -z "$WORK" ]]; then
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_SILENT=true
CUDA="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')"
echo "gpu_check: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: the CPU path")')"

if [[ ! -f "$WORK/shards/manifest.json" ]]; then
    "$PYTHON" -c "from pathlib import Path; from data_prep.docstring_corpus import write_corpus; write_corpus(Path('$WORK/corpus.jsonl'), 4 << 20)"
    "$PYTHON" -m pipeline.cli tokenizer --input "$WORK/corpus.jsonl" --vocab-size 8000 --out "$WORK/tokenizer" > /dev/null
    "$PYTHON" -m pipeline.cli shard --input "$WORK/corpus.jsonl" --tokenizer "$WORK/tokenizer" --seq-len 128 --out "$WORK/shards" > /dev/null
fi
rm -rf "$WORK/tiny-bf16" "$WORK/bert-base"  # measured afresh each time; the data is kept
DATA=("data.shards=$WORK/shards" "data.tokenizer=$WORK/tokenizer")
COMMON=("train.log_every=1" "eval.every_steps=0" "checkpoint.every_steps=1000" "wandb.mode=disabled")

"$PYTHON" -m pipeline.pretrain --config configs/tiny.yaml --run-dir "$WORK/tiny-bf16" "${DATA[@]}" "${COMMON[@]}" \
    train.precision=bf16 train.max_steps=8 adversarial.start_step=4 train.global_batch_size=16 train.micro_batch_size=8 \
    > "$WORK/tiny-bf16.log" 2>&1 || { tail -20 "$WORK/tiny-bf16.log"; exit 1; }

SIZE_RUN=tiny-bf16
if [[ "$CUDA" == 1 ]]; then
    SIZE_RUN=bert-base
    "$PYTHON" -m pipeline.pretrain --config configs/bert-base.yaml --run-dir "$WORK/bert-base" "${DATA[@]}" "${COMMON[@]}" \
        train.global_batch_size=32 train.max_steps=16 adversarial.start_step=8 > "$WORK/bert-base.log" 2>&1 \
        || { tail -20 "$WORK/bert-base.log"; exit 1; }
fi

"$PYTHON" - "$WORK" "$SIZE_RUN" <<'EOF'
import json, statistics, sys
from pathlib import Path

work = Path(sys.argv[1])
def records(name):
    return [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]

tiny = [r for r in records("tiny-bf16") if r["train/adv_active"]]
guard = "numerically zero" in (work / "tiny-bf16.log").read_text()
ok = len(tiny) == 4 and all(r["train/loss_adv"] > 0 for r in tiny) and not guard
print(f"gpu_check: tiny model, bf16 ALUM: {len(tiny)} ALUM steps, loss_adv from {min(r['train/loss_adv'] for r in tiny):.2e} "
      f"to {max(r['train/loss_adv'] for r in tiny):.2e}, guard {'fired' if guard else 'silent'}: {'OK' if ok else 'FAILED'}")

run = sys.argv[2]
size = records(run)
config = json.loads((work / run / "model" / "config.json").read_text())
start = next(r["step"] for r in size if r["train/adv_active"])
standard = [r for r in size if 3 <= r["step"] < start]  # after two warm-up steps of each kind
alum = [r for r in size if r["step"] >= start + 2]
seq_len = json.loads((work / "shards" / "manifest.json").read_text())["seq_len"]
batch = round(standard[0]["perf/tokens_per_s"] * standard[0]["perf/step_seconds"] / seq_len)
def median(rows, key):
    return statistics.median(r[key] for r in rows)
def mfu(rows):
    if all("perf/mfu" in r for r in rows):
        return f", MFU {median(rows, 'perf/mfu'):.1%}"
    return ", no MFU (no peak in pipeline/flops.py)" if run == "bert-base" else ""
name = f"hidden {config['hidden_size']} x {config['num_hidden_layers']} layers"
print(f"gpu_check: {name}, batch {batch} x {seq_len}: standard {median(standard, 'perf/step_seconds'):.3f} s/step "
      f"({median(standard, 'perf/tokens_per_s'):,.0f} tok/s{mfu(standard)}); ALUM {median(alum, 'perf/step_seconds'):.3f} s/step "
      f"({median(alum, 'perf/tokens_per_s'):,.0f} tok/s{mfu(alum)}); ALUM/standard step time "
      f"{median(alum, 'perf/step_seconds') / median(standard, 'perf/step_seconds'):.2f}")
sys.exit(0 if ok else 1)
EOF
