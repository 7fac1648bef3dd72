#!/usr/bin/env bash
# Start a vLLM server for a LoRA pool, with the flags `serve.py --engine vllm` and `main.py --engine vllm` need:
# LoRA on, runtime adapter loads allowed (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1), the base model served as "base",
# --max-lora-rank large enough for a mixture of LORA_NUM adapters of the pool's largest rank, and the pool's
# adapters registered under their names (for clients that name one). On CPU it uses vLLM's CPU build from
# `make vllm` (.venv-vllm); on a GPU point VLLM_PYTHON at a virtualenv with the CUDA build.
#
#   bash bench/start_vllm.sh                                    # embedded model and pool, port 8100
#   BASE_MODEL=meta-llama/Llama-2-7b-hf CONFIG=config/paper_pool.json DEVICE=cuda DTYPE=bfloat16 \
#     VLLM_PYTHON=/opt/vllm/bin/python bash bench/start_vllm.sh --tensor-parallel-size 2
#
# Environment: PORT (8100), BASE_MODEL (embedded:smollm2-135m-instruct), CONFIG (config/bigbench_pool.json),
# ADAPTER_PATTERN (pool entries without a path; default loras/{name}), LORA_NUM (3), MAX_LORAS (16), DEVICE (cpu),
# DTYPE (float32), MAX_NUM_SEQS (32), MAX_MODEL_LEN (2048), PYTHON (.venv/bin/python), VLLM_PYTHON (.venv-vllm/bin/python).
# Extra arguments go to vLLM as they are. serve.py must get the same rank: --vllm_max_lora_rank (printed below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" - "$@" <<'PY'
import os, shlex, sys

from utils.adapter_files import read_adapter_config_rank
from utils.data import load_pool_config
from utils.model_loading import resolve_model_path
from utils.vllm_compositions import vllm_rank
from utils.vllm_launch import vllm_command

env = os.environ
entries = load_pool_config(env.get("CONFIG", "config/bigbench_pool.json"), env.get("ADAPTER_PATTERN") or None)
k = int(env.get("LORA_NUM", "3"))
top = max(read_adapter_config_rank(e.path) for e in entries)
rank = vllm_rank(k * top)
argv, extra_env = vllm_command(resolve_model_path(env.get("BASE_MODEL", "embedded:smollm2-135m-instruct")), port=int(env.get("PORT", "8100")),
                               max_lora_rank=rank, max_loras=int(env.get("MAX_LORAS", "16")),
                               lora_modules={e.name: e.path for e in entries}, dtype=env.get("DTYPE", "float32"),
                               device=env.get("DEVICE", "cpu"), python=env.get("VLLM_PYTHON", ".venv-vllm/bin/python"),
                               max_model_len=int(env.get("MAX_MODEL_LEN", "2048")), max_num_seqs=int(env.get("MAX_NUM_SEQS", "32")),
                               extra=sys.argv[1:])
print(f"vLLM for {len(entries)} adapters (largest rank {top}; a mixture of {k} needs {k * top}): --max-lora-rank {rank}. "
      f"Start serve.py with --engine vllm --vllm_url http://127.0.0.1:{env.get('PORT', '8100')} --vllm_max_lora_rank {rank}",
      file=sys.stderr)
print(" ".join(f"{a}={shlex.quote(b)}" for a, b in extra_env.items()), shlex.join(argv), file=sys.stderr)
os.execvpe(argv[0], argv, {**env, **extra_env})
PY
