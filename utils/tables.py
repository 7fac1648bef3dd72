"""Stage: tables. Pure functions from per-row results to the paper's tables.

    task_scores(rows)                -> {task: {"domain", "metric", "n", "scores": {name: value}}}
    domain_rows(per_run, runs)       -> [(label, [value or None per run])]: one row per domain x paper
                                        metric (a domain's score is the mean of its tasks' scores),
                                        then an "Average" row (the mean of the rows above)
    task_rows(per_run, runs, extra)  -> [(label, [...])]: one row per task x metric
    oracle_rows(rows, runs, oracle)  -> [(label, [...])]: each row of ``rows`` as % of the oracle run's value
                                        (100 * score / score of perfect selection, ``best_selection``)
    to_markdown / to_latex / to_csv  -> text. A missing score is shown as missing, never as 0.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import OrderedDict

from utils.metrics import EXTRA_METRICS, METRIC_LABELS, PAPER_METRICS, score_task

logger = logging.getLogger(__name__)

Row = tuple[str, list]


def task_scores(rows: list[dict], run: str = "") -> "OrderedDict[str, dict]":
    """Score the rows of one run, task by task (tasks in order of first appearance).

    Rows with an unknown metric are left out with a warning; a missing or non-string prediction is
    scored as the empty string with a warning. Nothing is dropped silently.
    """
    groups: "OrderedDict[str, dict]" = OrderedDict()
    n_missing, n_unknown, renamed = 0, 0, set()
    for row in rows:
        task = str(row.get("task", "")).strip()
        if task != row.get("task"):
            renamed.add(repr(row.get("task")))
        metric = str(row.get("metric", "")).strip().lower()
        if metric not in PAPER_METRICS:
            n_unknown += 1
            continue
        pred = row.get("predicted_answer")
        if not isinstance(pred, str):
            n_missing += 1
            pred = "" if pred is None else str(pred)
        g = groups.setdefault(task, {"domain": str(row.get("domain", "")), "metric": metric, "preds": [], "targets": []})
        if g["metric"] != metric:
            raise ValueError(f"Run {run!r}: task {task!r} mixes the metrics {g['metric']!r} and {metric!r}; give each task one metric.")
        g["preds"].append(pred)
        g["targets"].append(str(row.get("targets", "")))
    if n_missing:
        logger.warning("Run %s: %d row(s) without a string predicted_answer were scored as empty predictions", run, n_missing)
    if n_unknown:
        logger.warning("Run %s: %d row(s) with an unknown metric (not em/bleu/rouge) were left out of the tables", run, n_unknown)
    if renamed:
        logger.info("Run %s: stripped white space from task names %s", run, ", ".join(sorted(renamed)))
    out: "OrderedDict[str, dict]" = OrderedDict()
    for task, g in groups.items():
        scores, notes = score_task(g["metric"], g["preds"], g["targets"])
        if notes:
            logger.info("Run %s, task %s: %d row(s): %s", run, task, len(notes), "; ".join(sorted(set(notes))))
        out[task] = {"domain": g["domain"], "metric": g["metric"], "n": len(g["preds"]), "scores": scores}
    return out


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def _domains(per_run: dict, runs: list[str]) -> "OrderedDict[tuple, list[str]]":
    """(domain, metric kind) -> tasks, in order of first appearance over the runs."""
    out: "OrderedDict[tuple, list[str]]" = OrderedDict()
    for run in runs:
        for task, info in per_run[run].items():
            tasks = out.setdefault((info["domain"], info["metric"]), [])
            if task not in tasks:
                tasks.append(task)
    return out


def domain_rows(per_run: dict, runs: list[str]) -> list[Row]:
    """The paper's domain x metric rows plus an Average row (see the module docstring).

    A run lacking any task of a domain has no score for that domain (missing, not 0).
    """
    rows: list[Row] = []
    for (domain, kind), tasks in _domains(per_run, runs).items():
        for metric in PAPER_METRICS[kind]:
            values = []
            for run in runs:
                task_values = [per_run[run].get(t, {}).get("scores", {}).get(metric) for t in tasks]
                values.append(_mean(task_values))
            rows.append((f"{domain} ({METRIC_LABELS[metric]})", values))
    if rows:
        rows.append(("Average", [_mean([r[1][i] for r in rows]) for i in range(len(runs))]))
    return rows


def task_rows(per_run: dict, runs: list[str], extra: bool = True) -> list[Row]:
    """One row per task and metric (paper metrics, then the extra ones when ``extra``)."""
    rows: list[Row] = []
    for (domain, kind), tasks in _domains(per_run, runs).items():
        metrics = PAPER_METRICS[kind] + (EXTRA_METRICS[kind] if extra else ())
        for task in tasks:
            for metric in metrics:
                rows.append((f"{task} [{domain}] ({METRIC_LABELS[metric]})",
                             [per_run[run].get(task, {}).get("scores", {}).get(metric) for run in runs]))
    return rows


ORACLE = "best_selection"


def oracle_rows(rows: list[Row], runs: list[str], oracle: str = ORACLE) -> list[Row]:
    """``rows`` (the domain rows and their Average) as "% of oracle" rows: 100 * v / v_oracle, run by run.

    The field's summary of a router (LoRAuter reports it): the score relative to perfect selection, the run that
    gives every input its own task's adapter. Empty when no run is named ``oracle``; a row whose oracle value is
    missing or 0 has no percentages (missing, not 0).
    """
    if oracle not in runs:
        return []
    j = runs.index(oracle)
    out: list[Row] = []
    for label, values in rows:
        ref = values[j]
        out.append((f"% of oracle: {label}", [None if v is None or not ref else 100.0 * v / ref for v in values]))
    return out


def _fmt(value, missing: str, digits: int = 2) -> str:
    return missing if value is None else f"{value:.{digits}f}"


def to_markdown(rows: list[Row], runs: list[str], first: str = "Domain (metric)") -> str:
    lines = [f"| {first} | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(v, "–") for v in values) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return re.sub(r"[\\&%$#_{}~^]", lambda m: _LATEX_SPECIAL[m.group()], text)


def to_latex(rows: list[Row], runs: list[str], first: str = "Domain (metric)", caption: str | None = None) -> str:
    """A booktabs table; the best value of each row is bold; missing values show as --."""
    cols = "l" + "r" * len(runs)
    out = ["\\begin{table}[t]", "\\centering", f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
           " & ".join([_latex_escape(first)] + [_latex_escape(r) for r in runs]) + " \\\\", "\\midrule"]
    for label, values in rows:
        if label == "Average" or label == f"% of oracle: {rows[0][0]}":
            out.append("\\midrule")
        present = [v for v in values if v is not None]
        best = max(present) if present else None
        cells = []
        for v in values:
            cell = _fmt(v, "--")
            cells.append(f"\\textbf{{{cell}}}" if v is not None and v == best and len(present) > 1 else cell)
        out.append(" & ".join([_latex_escape(label)] + cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        out.append(f"\\caption{{{_latex_escape(caption)}}}")
    out.append("\\end{table}")
    return "\n".join(out) + "\n"


def to_csv(rows: list[Row], runs: list[str], first: str = "Domain (metric)") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([first] + runs)
    for label, values in rows:
        w.writerow([label] + ["" if v is None else f"{v:.4f}" for v in values])
    return buf.getvalue()
