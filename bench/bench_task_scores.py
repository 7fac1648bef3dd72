"""The task x adapter score matrix of the embedded pool: the two scorers, and successive halving against the full matrix.

    python bench/bench_task_scores.py                     # writes docs/bench_task_scores.{json,md}

On the embedded pool (``make pool`` first) and its 13 tasks (each entry's card: 20 labelled rows):

1. the full matrix by ``loglik`` (mean target log-likelihood, one forward per row) and by ``metric`` (the task's own
   metric on greedy answers of up to ``--max_new_tokens`` tokens), each timed, with no cache;
2. how often the two agree on each task's best adapter (the reason the cheaper one may be the default);
3. successive halving (``--first`` rows at the first rung) against the full matrix of the same scorer: the best adapter
   it finds per task, and its cost in row forwards;
4. the cached matrix read back (what a rerun pays).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_helpers import cpu_name  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="config/bigbench_pool.json")
    p.add_argument("--base_model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--max_new_tokens", type=int, default=40, help="the embedded profile's")
    p.add_argument("--first", type=int, default=2, help="rows at the first rung of successive halving")
    p.add_argument("--rows", type=int, default=None, help="rows of each task scored at most (default: all)")
    p.add_argument("--scorers", nargs="+", default=["loglik", "metric"])
    p.add_argument("--halving_scorers", nargs="+", default=["loglik"], help="the scorers successive halving is run with")
    p.add_argument("--out", default="docs/bench_task_scores")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from utils.adapter_pool import AdapterPool
    from utils.data import load_pool_config
    from utils.model_loading import load_base_model, load_tokenizer
    from utils.prompter import Prompter
    from utils.task_library import tasks_from_pool
    from utils.task_scores import ScoreCache, TaskScorer, halving_cost, score_matrix

    entries = load_pool_config(args.config_path)
    tasks = tasks_from_pool(entries)
    names = [e.name for e in entries]
    paths = {e.name: e.path for e in entries}
    tokenizer = load_tokenizer(args.base_model)
    model = load_base_model(args.base_model, "float32", "cpu")
    pool = AdapterPool(model, entries, show_progress=False)
    prompter = Prompter("alpaca")
    out = {"command": "python bench/bench_task_scores.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"cpu": cpu_name(), "cores": torch.get_num_threads(), "python": platform.python_version()},
           "tasks": len(tasks), "adapters": len(names), "rows_per_task": sorted({min(args.rows or len(t.inputs), len(t.inputs)) for t in tasks}),
           "scorers": {}}
    work = Path(tempfile.mkdtemp(prefix="task_scores_"))
    full = {}
    for scorer_name in args.scorers:
        scorer = TaskScorer(pool, tokenizer, prompter, paths, scorer_name, ScoreCache(work / f"{scorer_name}.json"),
                            max_new_tokens=args.max_new_tokens)
        t0 = time.time()
        m = score_matrix(scorer, tasks, names, args.rows, halving=False)
        t_full = time.time() - t0
        full[scorer_name] = m
        t0 = time.time()
        again = score_matrix(TaskScorer(pool, tokenizer, prompter, paths, scorer_name, ScoreCache(work / f"{scorer_name}.json")),
                             tasks, names, args.rows, halving=False)
        t_cached = time.time() - t0
        out["scorers"][scorer_name] = {
            "full": {"seconds": round(t_full, 1), "row_passes": m.forwards, "best": m.best(), "matrix": m.as_json()["scores"]},
            "cached_rerun": {"seconds": round(t_cached, 2), "computed": again.pairs, "cached": again.cached},
            "own_adapter_best": sum(m.best()[t] == t for t in m.tasks),
        }
        if scorer_name in args.halving_scorers:
            halving_scorer = TaskScorer(pool, tokenizer, prompter, paths, scorer_name, ScoreCache(None), max_new_tokens=args.max_new_tokens)
            t0 = time.time()
            h = score_matrix(halving_scorer, tasks, names, args.rows, halving=True, first=args.first)
            out["scorers"][scorer_name]["halving"] = {
                "seconds": round(time.time() - t0, 1), "row_passes": h.forwards, "first": args.first, "best": h.best(),
                "agrees_with_full": sum(m.best()[t] == h.best()[t] for t in m.tasks),
                "cost_formula": sum(halving_cost(len(names), min(args.rows or len(t.inputs), len(t.inputs)), args.first) for t in tasks)}
    if {"loglik", "metric"} <= set(full):
        a, b = full["loglik"].best(), full["metric"].best()
        out["agreement"] = {"same_best": sum(a[t] == b[t] for t in a), "tasks": len(a),
                            "differ": {t: {"loglik": a[t], "metric": b[t]} for t in a if a[t] != b[t]}}
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(table(out))
    print(table(out))
    return 0


def table(out: dict) -> str:
    lines = [f"{out['tasks']} tasks x {out['adapters']} adapters, {out['rows_per_task']} rows per task; {out['machine']['cpu']}, "
             f"{out['machine']['cores']} threads.", "",
             "| scorer | full matrix: s | row passes | own adapter best | halving: s | row passes | same best as full | cached rerun: s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in out["scorers"].items():
        h = s.get("halving")
        half = [str(h["seconds"]), str(h["row_passes"]), f"{h['agrees_with_full']}/{out['tasks']}"] if h else ["–", "–", "–"]
        lines.append(f"| {name} | {s['full']['seconds']} | {s['full']['row_passes']} | {s['own_adapter_best']}/{out['tasks']} | "
                     + " | ".join(half) + f" | {s['cached_rerun']['seconds']} |")
    if "agreement" in out:
        a = out["agreement"]
        lines += ["", f"loglik and metric name the same best adapter for {a['same_best']} of {a['tasks']} tasks."]
        for t, d in a["differ"].items():
            lines.append(f"- {t}: loglik {d['loglik']}, metric {d['metric']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
