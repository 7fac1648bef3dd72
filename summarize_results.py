"""Turn a folder of results files into the paper's tables (LaTeX, Markdown, CSV) and bar charts.

    python summarize_results.py --results_dir results/embedded --out_dir results/embedded/summary

Each ``*.json`` results file of ``--results_dir`` is one run (column), named by its file stem. Column
order: ``--runs`` when given, else the order listed in ``<results_dir>/runs.txt`` (which eval_all.sh
writes), else sorted names. Metrics are the paper's (EM, sentence BLEU, ROUGE-1/2/L of the ``rouge``
package), with corpus sacreBLEU and rouge-score ROUGE-L alongside in the task table.

Writes to ``--out_dir``: domain.{md,tex,csv} (domain x metric rows and an Average row),
tasks.{md,tex,csv} (task x metric rows), scores.json, and charts/<domain>.png. The domain table is
also printed to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("summarize_results")


def discover_runs(results_dir: Path, runs: list[str] | None) -> list[tuple[str, Path]]:
    """(name, path) of the runs to summarise, in column order."""
    files = {p.stem: p for p in sorted(results_dir.glob("*.json")) if not p.name.startswith(".")}
    if runs:
        order = runs
    elif (results_dir / "runs.txt").is_file():
        order = [l.strip() for l in (results_dir / "runs.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
        order += sorted(set(files) - set(order))
    else:
        order = sorted(files)
    out = []
    for name in order:
        path = Path(name) if name.endswith(".json") and Path(name).is_file() else files.get(name)
        if path is None:
            logger.warning("Run %r listed but %s/%s.json does not exist; its column is left out", name, results_dir, name)
            continue
        out.append((Path(name).stem, path))
    return out


def load_runs(pairs: list[tuple[str, Path]], broken: list[str] | None = None) -> dict[str, list[dict]]:
    """{run name: rows} of the readable results files; each unreadable one is logged and described in ``broken``."""
    from utils.results import load_results

    runs = {}
    for name, path in pairs:
        try:
            _, rows = load_results(path)
        except ValueError as err:  # InputError, JSON and UTF-8 errors: the message names the file and the cause
            logger.warning("Skipping %s", err)
            if broken is not None:
                broken.append(str(err))
            continue
        runs[name] = rows
    return runs


def summarize(runs: dict[str, list[dict]]) -> tuple[list[str], dict, dict]:
    """(run names, per-run task scores, tables {name: rows}); pure apart from logging."""
    from utils.tables import domain_rows, oracle_rows, task_rows, task_scores

    names = list(runs)
    per_run = {name: task_scores(rows, name) for name, rows in runs.items()}
    domain = domain_rows(per_run, names)
    tables = {"domain": domain + oracle_rows(domain, names), "tasks": task_rows(per_run, names)}
    return names, per_run, tables


def write_outputs(out_dir: Path, names: list[str], per_run: dict, tables: dict, charts: bool = True) -> None:
    from utils.tables import to_csv, to_latex, to_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    firsts = {"domain": "Domain (metric)", "tasks": "Task [domain] (metric)"}
    for key, rows in tables.items():
        (out_dir / f"{key}.md").write_text(to_markdown(rows, names, firsts[key]), encoding="utf-8")
        (out_dir / f"{key}.tex").write_text(to_latex(rows, names, firsts[key]), encoding="utf-8")
        (out_dir / f"{key}.csv").write_text(to_csv(rows, names, firsts[key]), encoding="utf-8")
    (out_dir / "scores.json").write_text(json.dumps({"runs": names, "tasks": per_run}, indent=1, ensure_ascii=False), encoding="utf-8")
    if charts:
        from utils.charts import write_charts, write_oracle_chart

        rows = [r for r in tables["domain"] if not r[0].startswith("% of oracle: ")]
        write_charts(out_dir / "charts", names, rows)
        overall = dict(tables["domain"]).get("% of oracle: Average")
        if overall is not None:
            write_oracle_chart(out_dir / "charts" / "oracle_overview.png", names, overall)


def build_parser() -> argparse.ArgumentParser:
    from utils.flags import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--results_dir", default="results", help="folder of results files (*.json), one per run")
    p.add_argument("--runs", nargs="+", default=None, help="run names (file stems) or files, in column order")
    p.add_argument("--out_dir", default=None, help="where tables and charts go (default: <results_dir>/summary)")
    p.add_argument("--no_charts", action="store_true", help="skip the PNG charts")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        logger.error("Results folder %s does not exist; run main.py or eval_all.sh first, or pass --results_dir.", results_dir)
        return 2
    broken: list[str] = []
    runs = load_runs(discover_runs(results_dir, args.runs), broken)
    if not runs:
        if broken:
            logger.error("No readable results file in %s: %s", results_dir, " ".join(broken))
        else:
            logger.error("No results files in %s; run main.py or eval_all.sh first.", results_dir)
        return 2
    names, per_run, tables = summarize(runs)
    out_dir = Path(args.out_dir) if args.out_dir else results_dir / "summary"
    write_outputs(out_dir, names, per_run, tables, charts=not args.no_charts)
    from utils.tables import to_markdown

    sys.stdout.write(to_markdown(tables["domain"], names))
    logger.info("Tables and charts written to %s", out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
