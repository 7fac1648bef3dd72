#!/usr/bin/env bash
# Run the paper's sweep, then summarise it.
#
#   bash eval_all.sh [PROFILE]        PROFILE: embedded (default), llama2_7b or llama2_13b
#
# Runs: base (no adapter), perfect selection, then selection (top-1), mixture and fusion (top-3),
# each in-domain and OOD; then the comparison rows: mixture with softmax weights, Adapter Soup,
# LoraHub (one vector for the mixed set; one per task), LoRAuter (routing through tasks) and PEFT's Arrow,
# in-domain and OOD where OOD means something. All in one process. A finished run (its results file exists) is skipped unless
# FORCE=1; an interrupted one resumes from its checkpoint.
# Environment: PYTHON (interpreter), LAUNCH (how main.py starts, e.g. "torchrun --nproc_per_node 4";
# default: $PYTHON), DATA (evaluation file), OUT (results folder),
# EXTRA_ARGS (more main.py flags, e.g. "--limit 20"), FORCE=1 (redo finished runs),
# SKIP (run names to leave out, e.g. SKIP="arrow arrow_ood" for a pool of mixed ranks, which Arrow refuses),
# VLLM_URL (generate on these vLLM servers, bench/start_vllm.sh).
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

# One run per line: its name (the results file is $OUT/NAME.json), then its own main.py flags.
RUNS=(
  "base            --eval_type base"
  "best_selection  --best_selection"
  "selection       --eval_type mixture --lora_num 1"
  "selection_ood   --eval_type mixture --lora_num 1 --ood"
  "mixture         --eval_type mixture --lora_num 3"
  "mixture_ood     --eval_type mixture --lora_num 3 --ood"
  "fusion          --eval_type fusion  --lora_num 3"
  "fusion_ood      --eval_type fusion  --lora_num 3 --ood"
  "mixture_softmax      --eval_type mixture --lora_num 3 --weighting softmax"
  "mixture_softmax_ood  --eval_type mixture --lora_num 3 --weighting softmax --ood"
  "soup             --eval_type soup"
  "soup_ood         --eval_type soup --ood"
  "lorahub          --eval_type lorahub --lorahub_scope all"
  "lorahub_task     --eval_type lorahub --lorahub_scope task"
  "lorahub_task_ood --eval_type lorahub --lorahub_scope task --ood"
  "lorauter         --eval_type lorauter"
  "lorauter_ood     --eval_type lorauter --ood"
  "arrow            --eval_type arrow"
  "arrow_ood        --eval_type arrow --ood"
)
# (LoraHub's search settings and the softmax temperature come from the profile's settings file; Arrow runs
# last because it loads its own copy of the adapters into the base model.)
# VLLM_URL=http://host:8100 (one or more, space-separated): generation on vLLM (main.py --engine vllm); LoraHub and
# Arrow need the model in this process, so their runs are left out.
if [[ -n "${VLLM_URL:-}" ]]; then
  for url in $VLLM_URL; do EXTRA_ARGS="${EXTRA_ARGS:-} --vllm_url $url"; done
  EXTRA_ARGS="$EXTRA_ARGS --engine vllm"
  SKIP="${SKIP:-} lorahub lorahub_task lorahub_task_ood lorauter lorauter_ood arrow arrow_ood"
  echo "eval_all.sh: generating on vLLM at $VLLM_URL; the LoraHub, LoRAuter and Arrow runs need the model in-process and are left out." >&2
fi
if [[ -n "${SKIP:-}" ]]; then
  KEPT=()
  for spec in "${RUNS[@]}"; do
    name=${spec%% *}
    if [[ " $SKIP " != *" $name "* ]]; then KEPT+=("$spec"); fi
  done
  RUNS=("${KEPT[@]}")
fi
# All runs in one process: the base model, the adapters and the retriever load once for the whole sweep.
# EXTRA_ARGS are appended to every run's flags, so they win over a run's own (quotes work: they are parsed
# like a shell command line).
SPECS=()
for spec in "${RUNS[@]}"; do
  SPECS+=("$spec ${EXTRA_ARGS:-}")
done
FORCE_FLAG=()
if [[ "$FORCE" == 1 ]]; then FORCE_FLAG=(--force); fi
# shellcheck disable=SC2086  # LAUNCH is a word list
$LAUNCH main.py --settings "$SETTINGS" --data_path "$DATA" --res_dir "$OUT" "${FORCE_FLAG[@]}" --runs "${SPECS[@]}"

printf '%s\n' "${RUNS[@]}" | awk '{print $1}' > "$OUT/runs.txt"
"$PYTHON" summarize_results.py --results_dir "$OUT"
