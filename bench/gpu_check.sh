#!/usr/bin/env bash
# The GPU check, for the few minutes a GPU is lent: under 5 minutes on one GPU, nothing compiled.
#
#   bash bench/gpu_check.sh [WORK]     # WORK: where data and runs go (default: a temporary folder, removed)
#
# 1. Data that needs no download: the demo's corpus (Python's docstrings), a tokenizer, 128-token shards.
# 2. bf16 ALUM pretraining of the tiny model: every ALUM step has loss_adv > 0 and the vanishing guard stays silent.
# 3. SMART under bf16: with the teacher equal to the student the proximal term is exactly 0 (same kernels, same dropout).
# 4. fp16 ALUM pretraining of the tiny model (GPU only: a CPU has no fp16): every ALUM step's ascent gradient is non-zero.
# 5. alum finetune --deepspeed (ZeRO-2, precision auto) of run 2's export for 6 steps: it saves float32 weights.
# 6. The shipped bert-base config at batch 256 x 128 (2 micro-batches of 128: the model, not kernel launches, sets
#    the time; GPU only): 8 standard steps, then 8 ALUM steps; tokens/s, perf/mfu and the ALUM/standard step time
#    (medians after 2 warm-up steps of each). perf/mfu needs the GPU's exact name in pipeline/train/flops.py.
# Without CUDA, 4 and 6 are skipped (the output says so) and the timing line comes from run 2, so the script is
# tested on a CPU (tests/integration/test_gpu_check.py). Every line starts with "gpu_check:"; the exit code is 1 if a check failed.
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
rm -rf "$WORK/tiny-bf16" "$WORK/tiny-fp16" "$WORK/bert-base" "$WORK/tiny-hf" "$WORK/finetune"  # measured afresh; the data is kept
DATA=("data.shards=$WORK/shards" "data.tokenizer=$WORK/tokenizer")
COMMON=("train.log_every=1" "eval.every_steps=0" "checkpoint.every_steps=1000" "wandb.mode=disabled")
TINY=(--config configs/tiny.yaml "${DATA[@]}" "${COMMON[@]}" train.max_steps=8 adversarial.start_step=4
      train.global_batch_size=16 train.micro_batch_size=8)

run() {  # run NAME COMMAND...: its output goes to WORK/NAME.log, shown if it fails
    local name="$1"
    shift
    "$@" > "$WORK/$name.log" 2>&1 || { echo "gpu_check: $name failed:"; tail -20 "$WORK/$name.log"; exit 1; }
}

run tiny-bf16 "$PYTHON" -m pipeline.pretrain --run-dir "$WORK/tiny-bf16" "${TINY[@]}" train.precision=bf16
run smart "$PYTHON" bench/gpu_check.py smart "$WORK/smart.json"
if [[ "$CUDA" == 1 ]]; then
    run tiny-fp16 "$PYTHON" -m pipeline.pretrain --run-dir "$WORK/tiny-fp16" "${TINY[@]}" train.precision=fp16
fi
run export "$PYTHON" -m pipeline.cli export --run-dir "$WORK/tiny-bf16" --out "$WORK/tiny-hf"
"$PYTHON" bench/gpu_check.py task "$WORK/corpus.jsonl" "$WORK/task"
run finetune "$PYTHON" -m pipeline.finetune --model "$WORK/tiny-hf" --task "$WORK/task" --out "$WORK/finetune" --max-steps 6 \
    --eval-every 3 --batch-size 16 --deepspeed configs/deepspeed/zero2.json
if [[ "$CUDA" == 1 ]]; then
    run bert-base "$PYTHON" -m pipeline.pretrain --config configs/bert-base.yaml --run-dir "$WORK/bert-base" "${DATA[@]}" \
        "${COMMON[@]}" train.global_batch_size=256 train.micro_batch_size=128 train.max_steps=16 adversarial.start_step=8
fi

"$PYTHON" bench/gpu_check.py report "$WORK"
