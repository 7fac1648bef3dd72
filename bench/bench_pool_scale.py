"""Pool-scale benchmark: serve.py and main.py with synthetic pools of 13, 100, 1,000 and 5,000 adapters.

    python bench/bench_pool_scale.py                                  # writes docs/bench_pool_scale.{json,md}
    python bench/bench_pool_scale.py --sizes 13 100 --requests 32     # quick look
    git worktree add /tmp/before <commit> && python bench/bench_pool_scale.py --sizes 13 100 --checkout /tmp/before --out /tmp/before_scale

The pool: N adapters for the embedded base model (SmolLM2-135M), each r 8 on q_proj / v_proj (alpha 16, as the
embedded pool) with random A and B (seeded by its index), written once under --work_dir. Adapter i belongs to
suite task t = i mod 13 and is named ``<t>__<i // 13>``; its card is 20 inputs of task t: the suite's own card for
the first copy, a seeded random draw from the task's training rows for the others, so that every card (and mean
embedding) differs and retrieval spreads over the copies, as it would over many people's adapters for one task.

Per size, each a real process:

- ``start_cold_s`` / ``start_cached_s``: ``serve.py`` spawned to ``/health`` ready, with an empty card-embedding cache,
  then with the cache that first start wrote;
- ``cold_request_s`` / ``warm_request_s``: one request naming 3 adapters no request has used (read from disk), then
  the same request again;
- ``tok_s_16``: output tokens per second with 16 concurrent streaming clients replaying the suite's mixed test rows
  (``model: auto``, top-3 mixture, ``--requests`` requests of ``--max_tokens`` tokens each, ``ignore_eos``), the
  best of ``--repeats`` runs on one server;
- ``peak_rss_mb``: the server's peak resident memory (VmHWM) after all of the above, at the default tier sizes;
- ``main_s``: ``main.py --eval_type mixture --limit 16 --max_new_tokens 8`` wall time (cache warm).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_helpers import free_port, stop  # noqa: E402
from bench_serve import run_level  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench_pool_scale")


def write_adapters(work: Path, n: int, base_config: dict, shapes: dict[str, tuple[int, int]]) -> list[Path]:
    """Adapters 0..n-1 under work/adapters (those already written are kept)."""
    import torch
    from safetensors.torch import save_file

    out = []
    folder = work / "adapters"
    for i in range(n):
        d = folder / f"a{i:05d}"
        out.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for module, (d_in, d_out) in shapes.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, d_in, generator=g) * (1 / d_in ** 0.5)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, 8, generator=g) * 0.01
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(base_config))
    return out


def pool_config(work: Path, n: int, adapters: list[Path], suite: list[dict], train: dict[str, list[str]]) -> Path:
    rows = []
    for i in range(n):
        card = suite[i % len(suite)]
        task, copy = card["model_name"], i // len(suite)
        samples = card["sample"] if copy == 0 else [{"inputs": s} for s in random.Random(i).sample(train[task], min(20, len(train[task])))]
        rows.append({"model_name": f"{task}__{copy}", "domain": card.get("domain", ""), "sample": samples, "path": str(adapters[i])})
    path = work / f"pool_{n}.json"
    path.write_text(json.dumps(rows))
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def timed_start(args: list[str], log_path: Path, checkout: Path, timeout: float = 3600.0):
    """``serve.py ARGS`` of ``checkout`` on a free port: (process, url, seconds from spawn to /health ready)."""
    import os

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--log_level", "WARNING", *args], cwd=checkout,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"serve.py exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"serve.py did not start in {timeout:.0f} s; see {log_path}")


def serve_figures(config: Path, n: int, names: list[str], rows: list[dict], work: Path, a) -> dict:
    cache = work / f"cache_{n}"
    shutil.rmtree(cache, ignore_errors=True)
    common = ["--config_path", str(config), "--embedding_cache", str(cache), "--max_batch_size", "32", "--prompt_format", "raw"]
    out = {}
    checkout = Path(a.checkout)
    proc, url, out["start_cold_s"] = timed_start(common, work / f"serve_{n}_cold.log", checkout)
    stop(proc)
    proc, url, out["start_cached_s"] = timed_start(common, work / f"serve_{n}_cached.log", checkout)
    try:
        cold = names[-3:]  # never asked for before
        body = {"prompt": rows[0]["inputs"], "adapters": {m: 1 / 3 for m in cold}, "max_tokens": 4}
        for key in ("cold_request_s", "warm_request_s"):
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            out[key] = time.perf_counter() - t0
        if "throughput" in a.only:
            lengths = [a.max_tokens] * a.requests
            levels = [asyncio.run(run_level(url, rows, 16, a.requests, "auto", lengths)) for _ in range(a.repeats)]
            best = max(levels, key=lambda x: x["output_tokens_per_s"])
            out["tok_s_16"] = best["output_tokens_per_s"]
            out["tok_s_16_runs"] = [x["output_tokens_per_s"] for x in levels]
            out["ttft_p50_16_s"] = best["ttft_p50_s"]
        health = httpx.get(url + "/health", timeout=10).json()
        out["pool"] = health.get("pool")
        out["peak_rss_mb"] = peak_rss_mb(proc.pid)
    finally:
        stop(proc)
    return out


def main_figure(config: Path, n: int, work: Path, checkout: Path) -> float:
    cmd = [sys.executable, "main.py", "--eval_type", "mixture", "--limit", "16", "--max_new_tokens", "8", "--config_path", str(config),
           "--data_path", str(ROOT / "data/bigbench/combined_test.json"), "--res_path", str(work / f"main_{n}.json"), "--no_resume",
           "--embedding_cache", str(work / f"cache_{n}"), "--log_level", "WARNING"]
    (work / f"main_{n}.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(work / f"main_{n}.log", "w") as log:
        subprocess.run(cmd, cwd=checkout, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def table(results: list[dict]) -> str:
    head = ("| adapters | start-up, cards cold | start-up, cards cached | cold request (3 adapters from disk) | same request warm "
            "| 16 clients: out tok/s | peak RSS | main.py, 16 rows |")
    lines = [head, "|" + "---:|" * 8]
    f = lambda v, fmt: "" if v is None else fmt.format(v)  # noqa: E731
    for r in results:
        lines.append(f"| {r['adapters']:,} | {f(r.get('start_cold_s'), '{:.1f} s')} | {f(r.get('start_cached_s'), '{:.1f} s')} "
                     f"| {f(r.get('cold_request_s'), '{:.2f} s')} | {f(r.get('warm_request_s'), '{:.2f} s')} "
                     f"| {f(r.get('tok_s_16'), '{:.1f}')} | {f(r.get('peak_rss_mb'), '{:,.0f} MB')} | {f(r.get('main_s'), '{:.1f} s')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[13, 100, 1000, 5000])
    p.add_argument("--only", nargs="+", default=["serve", "throughput", "main"], choices=["serve", "throughput", "main"],
                   help="which figures (throughput needs serve)")
    p.add_argument("--throughput_sizes", type=int, nargs="+", default=[13, 100, 1000], help="sizes that get the 16-client run")
    p.add_argument("--requests", type=int, default=96, help="requests of the 16-client run")
    p.add_argument("--max_tokens", type=int, default=32, help="tokens per request of the 16-client run")
    p.add_argument("--repeats", type=int, default=2, help="16-client runs per size; the best is reported (all are in the json)")
    p.add_argument("--work_dir", default="/tmp/lora_pool_scale", help="where the synthetic adapters and pool configs go (kept)")
    p.add_argument("--checkout", default=str(ROOT), help="the checkout whose serve.py and main.py are timed (an older commit, to compare)")
    p.add_argument("--out", default="docs/bench_pool_scale", help="writes OUT.json and OUT.md")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    real = json.loads((ROOT / "config/bigbench_pool.json").read_text())
    base_cfg = json.loads((ROOT / "config/bigbench_pool.json").parent.joinpath(real[0]["path"], "adapter_config.json").read_text())
    base_cfg.update(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], base_model_name_or_path="embedded:smollm2-135m-instruct")
    shapes = {}
    for layer in range(30):  # SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64
        shapes[f"model.layers.{layer}.self_attn.q_proj"] = (576, 576)
        shapes[f"model.layers.{layer}.self_attn.v_proj"] = (576, 192)
    t0 = time.perf_counter()
    adapters = write_adapters(work, max(a.sizes), base_cfg, shapes)
    logger.info("%d synthetic adapters ready in %.0f s", len(adapters), time.perf_counter() - t0)
    train = {t: [r["inputs"] for r in json.loads((ROOT / f"data/bigbench/train/{t}.json").read_text())] for t in (c["model_name"] for c in real)}
    test_rows = json.loads((ROOT / "data/bigbench/combined_test.json").read_text())
    random.Random(0).shuffle(test_rows)
    results = []
    for n in a.sizes:
        config = pool_config(work, n, adapters, real, train)
        names = [r["model_name"] for r in json.loads(config.read_text())]
        res = {"adapters": n}
        if "serve" in a.only:
            only = a.only if n in a.throughput_sizes else [o for o in a.only if o != "throughput"]
            res.update(serve_figures(config, n, names, test_rows, work, argparse.Namespace(**{**vars(a), "only": only})))
        if "main" in a.only:
            res["main_s"] = main_figure(config, n, work, Path(a.checkout))
        logger.info("%s", res)
        results.append(res)
    out = {"command": "python bench/bench_pool_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "checkout": a.checkout, "results": results}
    Path(a.out + ".json").write_text(json.dumps(out, indent=1))
    Path(a.out + ".md").write_text(table(results))
    sys.stdout.write(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
