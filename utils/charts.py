"""Stage: charts. The summary's pictures, from its domain rows (:mod:`utils.tables`)."""

from __future__ import annotations

import re
from pathlib import Path


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
