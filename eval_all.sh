#!/usr/bin/env bash
# Run the paper's sweep, then summarise it.
#
#   bash eval_all.sh [PROFILE]        PROFILE: embedded (default), llama2_7b or llama2_13b
#
# Runs: base (no adapter), perfect selection, then selection (top-1), mixture and fusion (top-3),
# each in-domain and OOD. A finished run (its results file exists) is skipped unless FORCE=1.
# Environment: PYTHON (interpreter), LAUNCH (how main.py starts, e.g. "torchrun --nproc_per_node 4";
# default: $PYTHON), DATA (evaluation file), OUT (results folder),
# EXTRA_ARGS (more main.py flags, e.g. "--limit 20"), FORCE=1 (redo finished runs).
set -euo pipefail
cd "$(dirname "$0")"

PROFILE=${1:-${PROFILE:-embedded}}
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}
case "$PROFILE" in
  embedded)   SETTINGS=config/embedded.json;        DEFAULT_DATA=data/bigbench/combined_test.json ;;
  llama2_7b)  SETTINGS=config/paper_llama2_7b.json;  DEFAULT_DATA=data/paper/combined_test.json ;;
  llama2_13b) SETTINGS=config/paper_llama2_13b.json; DEFAULT_DATA=data/paper/combined_test.json ;;
  *) echo "eval_all.sh: unknown profile '$PROFILE'; use embedded, llama2_7b or llama2_13b." >&2; exit 2 ;;
esac
DATA=${DATA:-$DEFAULT_DATA}
OUT=${OUT:-results/$PROFILE}
FORCE=${FORCE:-0}
mkdir -p "$OUT"

RUNS=()
run() {
  local name=$1; shift
  RUNS+=("$name")
  if [[ -f "$OUT/$name.json" && "$FORCE" != 1 ]]; then
    echo "eval_all.sh: $OUT/$name.json exists; skipping $name (FORCE=1 redoes it)" >&2
    return 0
  fi
  # shellcheck disable=SC2086  # LAUNCH and EXTRA_ARGS are word lists
  $LAUNCH main.py --settings "$SETTINGS" --data_path "$DATA" --res_path "$OUT/$name.json" "$@" ${EXTRA_ARGS:-}
}

run base            --eval_type base
run best_selection  --best_selection
run selection       --eval_type mixture --lora_num 1
run selection_ood   --eval_type mixture --lora_num 1 --ood
run mixture         --eval_type mixture --lora_num 3
run mixture_ood     --eval_type mixture --lora_num 3 --ood
run fusion          --eval_type fusion  --lora_num 3
run fusion_ood      --eval_type fusion  --lora_num 3 --ood

printf '%s\n' "${RUNS[@]}" > "$OUT/runs.txt"
"$PYTHON" summarize_results.py --results_dir "$OUT"
