"""Routers on a pool of adapters that come without cards: the embedded suite's tasks, none of its own adapters.

    python bench/bench_wild_pool.py                       # writes docs/bench_wild_pool.{json,md}

The pool (under ``--work``, default ``loras/wild``):

- ``--adapters`` adapters (default 40) trained briefly (``--steps``) on other BIG-bench tasks, the retrieval training
  tasks of ``data/retrieval_train`` (none of them is a task of the suite), loaded *without* cards;
- plus randomly initialised adapters of the same shape as noise: 0, 1x and 4x as many as the useful ones
  (``--noise``), their B scaled so that their deltas are as large as the trained adapters' (mean Frobenius norm);
- the task library: the suite's 13 tasks (each pool entry's card of ``config/bigbench_pool.json``, 20 labelled rows);
  the 13 task-aligned adapters are not in the pool.

Every router that can run there is evaluated on the suite's test rows (``--rows_per_task`` per task): LoRAuter
(``lorauter``: through the task library), PEFT's Arrow (``arrow``), LoraHub (one vector over the pool, learned on the
task library's rows: ``lorahub``), Adapter Soup over the whole pool (``soup_all``: no domains without cards), the base
model; and LoraRetriever (``mixture``, top-3) where the useful adapters are given their cards (their training rows).
Scores are each run's average over the suite's domains (the summary's ``Average``) and the same as % of the curated
pool's oracle (``best_selection`` on the 13 task-aligned adapters, same rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_helpers import cpu_name  # noqa: E402

logger = logging.getLogger("bench_wild_pool")


def train_useful(args, work: Path) -> list[dict]:
    """The first ``--adapters`` retrieval-training tasks with at least 8 training rows: their adapters (trained if
    missing), with their cards. train_lora.py registers what it trains in the pool config it is given: a copy here."""
    train = ROOT / "data/retrieval_train/train"
    pool = [e for e in json.loads((ROOT / "data/retrieval_train/pool.json").read_text())
            if len(json.loads((train / f"{e['model_name']}.json").read_text())) >= 8][:args.adapters]
    config = work / "training_pool.json"
    config.write_text(json.dumps(pool, indent=1))
    missing = [e["model_name"] for e in pool if not (work / "useful" / e["model_name"] / "adapter_config.json").is_file()]
    if missing:
        cmd = [sys.executable, "train_lora.py", "--config_path", str(config), "--train_dir", str(train),
               "--adapter_dir", str(work / "useful"), "--steps", str(args.steps)]
        for t in missing:
            cmd += ["--task", t]
        logger.info("Training %d adapters on other BIG-bench tasks (%d steps each)", len(missing), args.steps)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return [dict(e, path=str(work / "useful" / e["model_name"])) for e in pool]


def make_noise(useful: list[dict], count: int, work: Path, seed: int = 0) -> list[dict]:
    """``count`` random LoRAs of the useful adapters' shape, deltas as large as theirs on average."""
    import torch
    from safetensors.torch import load_file, save_file

    first = Path(useful[0]["path"])
    config = json.loads((first / "adapter_config.json").read_text())
    shapes = {k: v.shape for k, v in load_file(first / "adapter_model.safetensors").items()}
    norms = []
    for e in useful:
        t = load_file(Path(e["path"]) / "adapter_model.safetensors")
        for k, v in t.items():
            if ".lora_A." in k:
                norms.append(float((t[k.replace(".lora_A.", ".lora_B.")].float() @ v.float()).norm()))
    target = sum(norms) / len(norms)
    out = []
    for i in range(count):
        d = work / "noise" / f"noise{i:03d}"
        if not (d / "adapter_model.safetensors").is_file():
            g = torch.Generator().manual_seed(seed + i)
            tensors = {k: torch.randn(s, generator=g) / s[-1] ** 0.5 for k, s in shapes.items()}
            for k in [k for k in tensors if ".lora_A." in k]:
                kb = k.replace(".lora_A.", ".lora_B.")
                tensors[kb] *= target / max(float((tensors[kb] @ tensors[k]).norm()), 1e-12)
            d.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, d / "adapter_model.safetensors")
            (d / "adapter_config.json").write_text(json.dumps(config))
        out.append({"model_name": f"noise{i:03d}", "domain": "noise", "path": str(d)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="loras/wild")
    p.add_argument("--adapters", type=int, default=40)
    p.add_argument("--steps", type=int, default=8, help="training steps of each useful adapter")
    p.add_argument("--noise", type=float, nargs="+", default=[0, 1, 4], help="noise adapters per useful adapter")
    p.add_argument("--rows_per_task", type=int, default=5, help="test rows per task")
    p.add_argument("--task_rows", type=int, default=None, help="validation rows per task LoRAuter scores on (default: all 20)")
    p.add_argument("--routers", nargs="+", default=["lorauter", "arrow", "lorahub", "soup_all", "base", "mixture_with_cards"])
    p.add_argument("--out", default="docs/bench_wild_pool")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.time()
    work = (ROOT / args.work).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)

    useful = train_useful(args, work)
    n_noise = {lvl: int(round(lvl * len(useful))) for lvl in args.noise}
    noise = make_noise(useful, max(n_noise.values()), work)
    suite = json.loads((ROOT / "config/bigbench_pool.json").read_text())
    library = work / "task_library.json"
    library.write_text(json.dumps([{"name": e["model_name"], "domain": e["domain"], "metric": e["metric"], "rows": e["sample"]}
                                   for e in suite], indent=1))
    rows = json.loads((ROOT / "data/bigbench/combined_test.json").read_text())
    per_task: dict[str, int] = {}
    subset = []
    for r in rows:
        if per_task.get(r["task"], 0) < args.rows_per_task:
            per_task[r["task"]] = per_task.get(r["task"], 0) + 1
            subset.append(r)
    data = work / "test_rows.json"
    data.write_text(json.dumps(subset))
    curated = ROOT / "config/bigbench_pool.json"

    def sweep(res_dir: Path, pool_config: Path, runs: list[str]) -> None:
        cmd = [sys.executable, "main.py", "--settings", "config/embedded.json", "--data_path", str(data), "--config_path", str(pool_config),
               "--res_dir", str(res_dir), "--task_library", str(library), "--task_scores", str(work / "task_scores.json"),
               "--lorahub_examples", "2", "--lorahub_budget", "20", "--task_candidates", "0",
               "--max_loras", str(max(64, len(useful) + len(noise))),  # LoraHub and Adapter Soup use the whole pool at once
               *(["--task_rows", str(args.task_rows)] if args.task_rows else []), "--runs", *runs]
        subprocess.run(cmd, cwd=ROOT, check=True)

    results: dict = {"oracle": None, "levels": {}}
    sweep(work / "runs" / "curated", curated, ["best_selection --best_selection"])
    results["oracle"] = average(work / "runs" / "curated" / "best_selection.json")
    for lvl in args.noise:
        entries = [{"model_name": e["model_name"], "domain": "", "path": e["path"]} for e in useful] + noise[:n_noise[lvl]]
        config = work / f"pool_noise{lvl:g}.json"
        config.write_text(json.dumps(entries, indent=1))
        specs = {"lorauter": "lorauter --eval_type lorauter", "arrow": "arrow --eval_type arrow",
                 "lorahub": "lorahub --eval_type lorahub --lorahub_scope all", "soup_all": "soup_all --eval_type soup --soup all",
                 "base": "base --eval_type base"}
        runs = [specs[r] for r in args.routers if r in specs and not (r == "base" and lvl != args.noise[0])]
        res = work / "runs" / f"noise{lvl:g}"
        sweep(res, config, runs)
        level = {r.split()[0]: average(res / f"{r.split()[0]}.json") for r in runs}
        if "mixture_with_cards" in args.routers:
            carded = work / f"pool_cards_noise{lvl:g}.json"
            carded.write_text(json.dumps([{"model_name": e["model_name"], "domain": e["domain"], "sample": e["sample"], "path": e["path"]}
                                          for e in useful] + noise[:n_noise[lvl]], indent=1))
            sweep(res, carded, ["mixture_with_cards --eval_type mixture --lora_num 3"])
            level["mixture_with_cards"] = average(res / "mixture_with_cards.json")
        results["levels"][f"{lvl:g}"] = {"noise_adapters": n_noise[lvl], "scores": level}
    out = {"command": "python bench/bench_wild_pool.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"cpu": cpu_name(), "python": platform.python_version()}, "useful_adapters": len(useful),
           "training_steps": args.steps, "rows": len(subset), "rows_per_task": args.rows_per_task, "task_rows": args.task_rows,
           "seconds": round(time.time() - t_start, 1), **results}
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(table(out))
    print(table(out))
    return 0


def average(path: Path) -> float:
    """The run's summary Average (mean over the suite's domain x metric rows)."""
    from utils.tables import domain_rows, task_scores

    rows = json.loads(path.read_text())["rows"]
    per_run = {"run": task_scores(rows, "run")}
    return float(dict(domain_rows(per_run, ["run"]))["Average"][0])


def table(out: dict) -> str:
    levels = list(out["levels"])
    oracle = out["oracle"]
    head = "| router | " + " | ".join(f"noise {lvl}x ({out['levels'][lvl]['noise_adapters']} random): score | % of oracle" for lvl in levels) + " |"
    lines = [f"{out['useful_adapters']} useful adapters ({out['training_steps']} training steps each, no cards) plus random ones; "
             f"the suite's 13 tasks as the task library; {out['rows']} test rows ({out['rows_per_task']} per task). "
             f"Curated pool's oracle (best_selection on the 13 task adapters): {oracle:.2f}.", "",
             head, "|---|" + "---:|---:|" * len(levels)]
    routers = list(dict.fromkeys(r for lvl in levels for r in out["levels"][lvl]["scores"]))
    for r in routers:
        cells = []
        for lvl in levels:
            v = out["levels"][lvl]["scores"].get(r, out["levels"][levels[0]]["scores"].get(r) if r == "base" else None)
            cells += ["–", "–"] if v is None else [f"{v:.2f}", f"{100 * v / oracle:.1f}%"]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
