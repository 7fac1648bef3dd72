"""Evaluate LoraRetriever on a mixed-task data file: retrieve LoRAs per input, compose them per sample, generate.

Example (the embedded default, offline on CPU):

    python main.py --data_path data/bigbench/combined_test.json --config_path config/bigbench_pool.json \\
        --res_path results/mixture.json --eval_type mixture --lora_num 3 --batch_size 8

The comparison rows use the same pool, data and decoding: ``--eval_type soup`` (Adapter Soup), ``arrow`` (PEFT's
Arrow) and ``lorahub`` (LoraHub), each with its own flags below.

Generation on a vLLM server (retrieval and composition stay here; each row's composition is registered with
vLLM as one LoRA): add ``--engine vllm --vllm_url http://127.0.0.1:8100`` (bench/start_vllm.sh starts one).

The paper's own setup on a GPU: add ``--settings config/paper_llama2_7b.json`` (base model, adapters and
retriever of the paper) and point ``--data_path`` at the paper's ``combined_test.json``.

Several runs in one process, the models loaded once (what ``eval_all.sh`` does):

    python main.py --settings config/embedded.json --data_path data/bigbench/combined_test.json \\
        --res_dir results/embedded --runs "base --eval_type base" "mixture --eval_type mixture --lora_num 3"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("main")


def build_parser() -> argparse.ArgumentParser:
    from utils import flags
    from utils.evaluation import EVAL_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    a = p.add_argument
    # The paper's flags.
    a("--data_path", help="evaluation rows: JSON list or JSON Lines of {inputs, targets, task, domain, metric} (required)")
    a("--res_path", help="results file to write, e.g. results/mixture.json (required)")
    flags.add_pool_flags(p)
    flags.add_composition_flags(p, EVAL_TYPES)
    a("--batch_size", type=int, default=8, help="rows generated together")
    a("--ood", action="store_true", help="out-of-domain: remove the row's own task adapter before taking the top k")
    a("--best_selection", action="store_true", help="perfect selection: use the row's own task adapter (k=1, weight 1)")
    add_baseline_flags(p)
    flags.add_task_routing_flags(p)
    # Models and retrieval.
    flags.add_model_flags(p)
    flags.add_engine_flags(p)
    flags.add_retrieval_flags(p)
    # Prompting and decoding.
    flags.add_prompt_flags(p)
    a("--max_input_tokens", type=int, default=None, help="keep only the last N prompt tokens (default: no cut)")
    # Run control.
    a("--limit", type=int, default=None, help="evaluate only the first N rows")
    a("--seed", type=int, default=42, help="random seed (decoding is greedy; recorded in the results)")
    a("--device_map", default=None, help="e.g. auto: spread a large base model over the visible GPUs")
    a("--no_resume", action="store_true", help="ignore and replace an existing checkpoint instead of resuming it")
    a("--runs", nargs="+", action="extend", default=None, metavar="'NAME FLAGS...'",
      help="a sweep in one process: each value is one run (its name, then its own flags on top of the others), "
           "written to --res_dir/NAME.json; the base model, adapters and retriever are loaded once for all runs")
    a("--res_dir", default=None, help="with --runs: the folder of the runs' results files")
    a("--force", action="store_true", help="with --runs: redo runs whose results file exists (default: skip them)")
    flags.add_settings_flag(p)
    a("--log_level", default="INFO", help="logging level")
    return p


def add_baseline_flags(p: argparse.ArgumentParser) -> None:
    """The comparison rows' own flags (--eval_type soup / arrow / lorahub)."""
    g = p.add_argument_group("baselines: Adapter Soup (--eval_type soup), PEFT's Arrow (arrow), LoraHub (lorahub)")
    a = g.add_argument
    a("--soup", default="domain", choices=("domain", "all"),
      help="soup: average (fuse, uniform weights) the adapters of the domain whose centroid is nearest to the input, or all adapters")
    a("--arrow_top_k", type=int, default=3, help="arrow: adapters each token is routed to, in each LoRA layer")
    a("--arrow_temperature", type=float, default=1.0, help="arrow: router softmax temperature (> 0)")
    a("--arrow_general_adapters", nargs="+", default=None, metavar="PATH",
      help="arrow: general-purpose LoRAs (same rank and targets as the pool); given, GenKnowSub subtracts their mean from "
           "every pool adapter before routing")
    a("--lorahub_scope", default="all", choices=("all", "task"),
      help="lorahub: one weight vector for the whole mixed test set (all), or one per task (task; an oracle that knows the task)")
    a("--lorahub_examples", type=int, default=5, help="lorahub: labelled pool samples per task to learn from")
    a("--lorahub_budget", type=int, default=40, help="lorahub: loss evaluations of the gradient-free search, per vector")
    a("--lorahub_candidates", default="pool", choices=("pool", "retrieved"),
      help="lorahub: weigh every pool adapter, or the --lora_num adapters retrieved for the scope's examples")
    a("--lorahub_optimizer", default="NGOpt", choices=("NGOpt", "CMA"), help="lorahub: nevergrad optimiser")
    a("--lorahub_l1", type=float, default=0.05, help="lorahub: weight of the L1 penalty mean|w| (LoraHub: 0.05)")
    a("--lorahub_dtype", default=None, choices=("float32", "bfloat16", "float16"),
      help="lorahub: compute the search's loss under autocast in this dtype (default: the model's); bfloat16 speeds a "
           "float32 model on CPUs with bf16 instructions; generation keeps the model's dtype")


def parse_settings(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults from ``--settings FILE`` when given; unknown flags and keys are errors."""
    from utils.flags import parse_with_settings

    return parse_with_settings(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    from utils.data import InputError

    try:
        args = parse_settings(argv)
    except InputError as err:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logger.error("%s", err)
        return 2
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from utils.distributed import dist_info, shutdown
    from utils.evaluation import run
    from utils.sweep import run_sweep

    try:
        if args.runs:
            run_sweep(args, build_parser)
        else:
            run(args)
    except InputError as err:
        logger.error("%s", err)
        return 2
    finally:
        shutdown(dist_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
