#!/usr/bin/env bash
# The GPU checks in one short script: the 7B-shaped throughput benchmark, the paper's path at full depth with local
# stand-ins (bench/paper_dry_run.py), and the serving benchmark on the same 7B-shaped stand-ins.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check/ ; PYTHON=.venv/bin/python by default
#
# Each step has its own time limit (STEP_TIMEOUT seconds, default 600) and a failed step does not stop the others;
# every step's log and figures land in OUT_DIR, with the card's name in OUT_DIR/device.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PYTHON=${PYTHON:-.venv/bin/python}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
WORK=${WORK:-$OUT/paper_dry_run}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/device.txt"

step() {  # step NAME COMMAND...
  local name=$1; shift
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

step throughput_7b "$PYTHON" bench/bench_throughput.py --synthetic llama2-7b --device cuda --dtype bfloat16 --num_adapters 48 \
    --rows 64 --batch_sizes 32 --max_new_tokens 32 --out "$OUT/bench_throughput_7b.json"
step paper_dry_run "$PYTHON" bench/paper_dry_run.py --device cuda --sweep_layers 32 --work_dir "$WORK" \
    --full_rows 32 --full_new_tokens 50 --out_md "$OUT/paper_dry_run.md"
step serve_7b "$PYTHON" bench/bench_serve.py --concurrency 1 16 32 --repeats 1 --configs lora base \
    --server_args "--settings config/paper_llama2_7b.json --base_model $WORK/base_L32 --retriever $WORK/lora_retriever --config_path $WORK/config2.json --adapter_pattern $WORK/loras_L32/llama2_7b_lora-{name} --device cuda" \
    --out "$OUT/bench_serve_7b"
cat "$OUT/steps.txt"
