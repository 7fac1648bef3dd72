"""Retrieval accuracy: how often the retriever finds each row's own task adapter (no language model needed).

    python evaluate_retrieval.py --data_path data/bigbench/combined_test.json --config_path config/bigbench_pool.json

Works on the paper's released files unchanged (its config2.json and combined_test.json). Reports, per
task, per domain and overall:
    task@k       the row's own task adapter is among the top k
    domain@k     an adapter of the row's domain is among the top k
    ood-domain@k the same with the row's own task adapter removed from the candidates (the OOD setting;
                 task@k does not apply there, the own adapter being excluded)
Tables go to --out_dir as retrieval.{md,tex,csv} (and retrieval.json); the Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import OrderedDict
from pathlib import Path

logger = logging.getLogger("evaluate_retrieval")


def retrieval_accuracy(retriever, rows: list[dict], pool_domains: dict[str, str], ks: list[int]) -> "OrderedDict[str, dict]":
    """{group label: {column: accuracy in %}} for each task, each domain and overall (pure apart from retrieval)."""
    import numpy as np

    kmax = max(ks)
    queries = retriever.embedder.encode([r["inputs"] for r in rows])
    names, _ = retriever.search_embeddings(queries, kmax)
    ood_names, _ = retriever.search_embeddings(queries, kmax, exclude=[r["task"] for r in rows])
    hits: dict[str, list[list[float]]] = OrderedDict()
    columns = [f"task@{k}" for k in ks] + [f"domain@{k}" for k in ks] + [f"ood-domain@{k}" for k in ks]
    for row, top, ood in zip(rows, names, ood_names):
        vals = [float(row["task"] in top[:k]) for k in ks]
        vals += [float(any(pool_domains.get(n) == row["domain"] for n in top[:k])) for k in ks]
        vals += [float(any(pool_domains.get(n) == row["domain"] for n in ood[:k])) for k in ks]
        for key in (f"task: {row['task']}", f"domain: {row['domain']}", "overall"):
            hits.setdefault(key, []).append(vals)
    out: "OrderedDict[str, dict]" = OrderedDict()
    ordered = [k for k in hits if k.startswith("task: ")] + [k for k in hits if k.startswith("domain: ")] + ["overall"]
    for key in ordered:
        arr = np.asarray(hits[key])
        out[key] = {"n": len(arr), **{c: 100.0 * float(v) for c, v in zip(columns, arr.mean(0))}}
    return out


def select_tasks(spec: list[str]) -> list[str]:
    """Task names from ``--tasks``: plain names, or a task_split.json (its held_out list)."""
    out = []
    for item in spec:
        if item.endswith(".json") and Path(item).is_file():
            out += json.loads(Path(item).read_text(encoding="utf-8"))["held_out"]
        else:
            out.append(item)
    return out


def build_parser() -> argparse.ArgumentParser:
    from utils.flags import HelpFormatter
    from utils.retrieval import PAPER_INSTRUCTION

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_path", default="data/bigbench/combined_test.json", help="evaluation rows (the paper's combined_test.json format)")
    p.add_argument("--config_path", default="config/bigbench_pool.json", help="pool config (the paper's config2.json format)")
    p.add_argument("--retriever", default="embedded:all-minilm-l6-v2", help="sentence-transformers model: id, local dir or embedded:NAME")
    p.add_argument("--instruction", default=PAPER_INSTRUCTION, help="retrieval instruction given as the embedding prompt")
    p.add_argument("--exclude_prompt_from_pooling", default="auto", choices=("auto", "yes", "no"), help="INSTRUCTOR-style pooling")
    p.add_argument("--adapter_vector", default="normalized_mean", choices=("normalized_mean", "mean"),
                   help="an adapter's vector: normalised mean of its sample embeddings, or the plain mean (the paper's code)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5], help="k values to report")
    p.add_argument("--out_dir", default="results/retrieval", help="where the tables go")
    p.add_argument("--device", default="cpu", help="embedding device")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="evaluate only the rows of these tasks (names, or a task_split.json whose held_out tasks are taken); the whole pool stays the candidates")
    return p


def main(argv=None) -> int:
    from utils.data import InputError, load_pool_config, load_rows
    from utils.retrieval import Embedder, LoraRetriever, exclude_prompt_choice

    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from utils.flags import resolve_device

    try:
        resolve_device(args.device)
        rows = load_rows(args.data_path)
        pool = load_pool_config(args.config_path, check_paths=False, adapter_pattern="{name}")
        if args.tasks:
            wanted = set(select_tasks(args.tasks))
            rows = [r for r in rows if r["task"] in wanted]
            if not rows:
                raise InputError(f"No row of {args.data_path} belongs to the tasks {sorted(wanted)}; check --tasks.")
        if max(args.ks) + 1 > len(pool) or min(args.ks) < 1:
            raise InputError(f"--ks must lie between 1 and {len(pool) - 1} (the pool has {len(pool)} adapters, one is removed for OOD).")
    except InputError as err:
        logger.error("%s", err)
        return 2
    exclude = exclude_prompt_choice(args.exclude_prompt_from_pooling)
    embedder = Embedder(args.retriever, args.instruction, device=args.device, exclude_prompt_from_pooling=exclude)
    retriever = LoraRetriever(embedder, [e.name for e in pool], [e.samples for e in pool], adapter_vector=args.adapter_vector)
    result = retrieval_accuracy(retriever, rows, {e.name: e.domain for e in pool}, sorted(args.ks))
    write_tables(Path(args.out_dir), result, {"retriever": args.retriever, "adapter_vector": args.adapter_vector, "data_path": args.data_path,
                                              "config_path": args.config_path, "tasks": args.tasks})
    return 0


def write_tables(out_dir: Path, result: dict, meta: dict) -> None:
    from utils.tables import to_csv, to_latex, to_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [c for c in next(iter(result.values())) if c != "n"]
    rows = [(f"{label} (n={v['n']})", [v[c] for c in columns]) for label, v in result.items()]
    first = "Group"
    (out_dir / "retrieval.md").write_text(to_markdown(rows, columns, first), encoding="utf-8")
    (out_dir / "retrieval.tex").write_text(to_latex(rows, columns, first), encoding="utf-8")
    (out_dir / "retrieval.csv").write_text(to_csv(rows, columns, first), encoding="utf-8")
    (out_dir / "retrieval.json").write_text(json.dumps({"meta": meta, "accuracy": result}, indent=1), encoding="utf-8")
    sys.stdout.write(to_markdown(rows, columns, first))


if __name__ == "__main__":
    sys.exit(main())
