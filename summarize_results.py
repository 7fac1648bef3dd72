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
import re
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
        rows = [r for r in tables["domain"] if not r[0].startswith("% of oracle: ")]
        write_charts(out_dir / "charts", names, rows)
        overall = dict(tables["domain"]).get("% of oracle: Average")
        if overall is not None:
            write_oracle_chart(out_dir / "charts" / "oracle_overview.png", names, overall)


def write_charts(chart_dir: Path, names: list[str], rows) -> list[Path]:
    """One PNG per domain: grouped bars, one group per metric, one bar per run (missing runs: no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chart_dir.mkdir(parents=True, exist_ok=True)
    by_domain: dict[str, list] = {}
    for label, values in rows:
        if label == "Average":
            continue
        domain, metric = label.rsplit(" (", 1)
        by_domain.setdefault(domain, []).append((metric.rstrip(")"), values))
    paths = []
    # Up to 10 runs take matplotlib's default colours; a longer sweep (the paper's rows plus the comparison rows)
    # takes 20 distinct ones, so that no two bars of a group share a colour.
    palette = plt.get_cmap("tab20").colors if len(names) > 10 else plt.get_cmap("tab10").colors
    for domain, metrics in by_domain.items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(names) * len(metrics), 3.2))
        width = 0.8 / max(1, len(names))
        for i, run in enumerate(names):
            xs = [m + i * width for m in range(len(metrics)) if metrics[m][1][i] is not None]
            ys = [metrics[m][1][i] for m in range(len(metrics)) if metrics[m][1][i] is not None]
            ax.bar(xs, ys, width, label=run, color=palette[i % len(palette)])
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], [m for m, _ in metrics])
        ax.set_ylabel("score")
        ax.set_title(domain)
        ax.legend(fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = chart_dir / (re.sub(r"[^\w.-]+", "_", domain).strip("_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def oracle_pairs(names: list[str], values: list) -> list[tuple[str, float | None, float | None]]:
    """(method, in-domain %, OOD %) for every run but the oracle: run X and its X_ood side by side, in run order."""
    from utils.tables import ORACLE

    by_name = dict(zip(names, values))
    out, seen = [], set()
    for name in names:
        method = name[:-4] if name.endswith("_ood") else name
        if method in seen or method == ORACLE:
            continue
        seen.add(method)
        out.append((method, by_name.get(method), by_name.get(method + "_ood")))
    return out


def write_oracle_chart(path: Path, names: list[str], values: list) -> Path:
    """Every method's overall % of oracle, in-domain and OOD side by side (horizontal bars, 100% marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = oracle_pairs(names, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * len(pairs)))
    ys = list(range(len(pairs)))[::-1]
    for offset, col, label, color in ((0.2, 1, "in-domain", "tab:blue"), (-0.2, 2, "OOD (own task's adapter left out)", "tab:orange")):
        pts = [(y + offset, p[col]) for y, p in zip(ys, pairs) if p[col] is not None]
        bars = ax.barh([y for y, _ in pts], [v for _, v in pts], 0.38, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.axvline(100, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(ys, [p[0] for p in pairs])
    ax.set_xlabel("overall score, % of perfect selection (oracle)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
