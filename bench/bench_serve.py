"""Serving benchmark: serve.py under 1, 4, 16 and 32 concurrent clients replaying mixed-task rows.

    python bench/bench_serve.py                                   # embedded default, writes docs/bench_serve.{json,md}
    python bench/bench_serve.py --concurrency 1 4 --requests_per_client 2 --max_tokens 8    # quick look

Three servers are started in turn (each a real ``python serve.py`` process on a free port):

- (a) ``lora``: this server, ``model=auto``: each request retrieves its top-k adapters and is composed per row
  inside batches that mix requests with different adapters (continuous batching).
- (b) ``same_adapters``: the same server with ``--batching same_adapters``: a batch only holds requests whose
  adapters and weights are identical, which is what a one-adapter-per-request server can batch.
- (c) ``base``: ``--no_adapters``, the base model alone (no pool, no retrieval, no composition).
- optionally ``dynamic``: this server with ``--batching dynamic``, where a batch runs to its end before the next
  forms, to measure what continuous batching gives.

Clients are asyncio tasks sharing one ``httpx.AsyncClient``; each sends its next row as soon as its last answer
is complete, with ``stream: true`` so that the time to first token is seen. Rows are the test rows of
``--data_path`` shuffled with ``--seed`` (mixed tasks, as in the wild). Request i generates exactly its own number
of tokens (``ignore_eos``; drawn once around ``--max_tokens``, the same for every server), so that all servers do
the same decoding work and requests of different lengths share batches. The servers run at the same time and
take turns level by level, ``--repeats`` times; the best run of each is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_helpers import free_port  # noqa: E402


def start_server(extra: list[str], log_path: Path, timeout: float = 300.0):
    port = free_port()
    log = open(log_path, "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--log_level", "WARNING", *extra], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve.py {' '.join(extra)} exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"serve.py {' '.join(extra)} did not start; see {log_path}")


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": tokens}


async def run_level(url: str, rows: list[dict], concurrency: int, n_requests: int, model: str, lengths: list[int]) -> dict:
    queue = [(row, lengths[i % len(lengths)]) for i, row in enumerate(rows[:n_requests])]
    results = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                row, max_tokens = queue.pop(0)
                body = {"model": model, "prompt": row["inputs"], "max_tokens": max_tokens, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}}
                results.append(await one_request(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return {"concurrency": concurrency, "requests": len(results), "seconds": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 3), "output_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "latency_p50_s": round(pct(lat, 0.5), 3), "latency_p95_s": round(pct(lat, 0.95), 3),
            "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p95_s": round(pct(ttft, 0.95), 3),
            "ttft_mean_s": round(statistics.mean(ttft), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="data/bigbench/combined_test.json", help="rows to replay (their 'inputs')")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent clients per level")
    p.add_argument("--requests_per_client", type=int, default=1, help="requests per level = this x concurrency (at least --min_requests)")
    p.add_argument("--min_requests", type=int, default=8, help="fewest requests in a level")
    p.add_argument("--max_tokens", type=int, default=32, help="mean tokens generated per request (ignore_eos)")
    p.add_argument("--spread", type=int, default=24, help="request i generates max_tokens - spread .. max_tokens + spread tokens "
                                                         "(seeded, the same sequence for every server; 0: all equal)")
    p.add_argument("--repeats", type=int, default=2, help="each level runs this many times per server, servers interleaved; the best is kept")
    p.add_argument("--configs", nargs="+", default=["lora", "same_adapters", "base", "dynamic"],
                   choices=["lora", "same_adapters", "base", "dynamic"],
                   help="servers to measure; dynamic: this server with --batching dynamic (no joining a running batch)")
    p.add_argument("--server_args", default="", help="extra serve.py flags for every server, e.g. '--settings config/embedded.json'")
    p.add_argument("--seed", type=int, default=0, help="row shuffle and length seed")
    p.add_argument("--out", default="docs/bench_serve", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if not 0 <= args.spread < args.max_tokens:
        raise SystemExit("--spread must be between 0 and --max_tokens - 1.")

    rows = json.loads((ROOT / args.data_path).read_text())
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    lengths = [rng.randint(args.max_tokens - args.spread, args.max_tokens + args.spread) for _ in range(len(rows))]
    server_flags = {"lora": ["--batching", "continuous"], "same_adapters": ["--batching", "same_adapters"], "base": ["--no_adapters"],
                    "dynamic": ["--batching", "dynamic"]}
    extra = args.server_args.split()
    cap = max(args.concurrency)
    out = {"command": "python bench/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "max_tokens": args.max_tokens, "spread": args.spread, "repeats": args.repeats, "data_path": args.data_path, "results": {}}
    servers = {}
    try:
        # All servers up at once (an idle server uses no CPU), so that the configurations of a level run
        # interleaved and a drift of this machine's speed does not favour the one measured first.
        for name in args.configs:
            servers[name] = start_server(extra + server_flags[name] + ["--max_batch_size", str(cap),
                                                                        "--max_tokens_cap", str(max(args.max_tokens + args.spread, 64))],
                                         ROOT / f".bench_serve_{name}.log")
        model = {name: "base" if name == "base" else "auto" for name in args.configs}
        for name, (_, url) in servers.items():
            asyncio.run(run_level(url, rows, 1, 2, model[name], lengths))  # warm-up
        best: dict[str, dict[int, dict]] = {name: {} for name in args.configs}
        for c in args.concurrency:
            n = max(args.min_requests, args.requests_per_client * c)
            for rep in range(args.repeats):
                for name, (_, url) in servers.items():
                    res = asyncio.run(run_level(url, rows, c, n, model[name], lengths))
                    print(f"{name:>14} c={c:<3} run {rep + 1}: {res['requests_per_s']:.2f} req/s {res['output_tokens_per_s']:.1f} tok/s "
                          f"p50 {res['latency_p50_s']:.2f}s p95 {res['latency_p95_s']:.2f}s ttft p50 {res['ttft_p50_s']:.2f}s", flush=True)
                    if c not in best[name] or res["output_tokens_per_s"] > best[name][c]["output_tokens_per_s"]:
                        best[name][c] = res
        out["results"] = {name: [best[name][c] for c in args.concurrency] for name in args.configs}
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(120)
    Path(ROOT / f"{args.out}.json").write_text(json.dumps(out, indent=1) + "\n")
    Path(ROOT / f"{args.out}.md").write_text(table(out) + "\n")
    sys.stdout.write(table(out) + "\n")
    return 0


def table(out: dict) -> str:
    lines = ["| server | clients | requests | req/s | output tok/s | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, levels in out["results"].items():
        for r in levels:
            lines.append(f"| {name} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                         f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} |")
    res = out["results"]
    notes = []
    if "lora" in res:
        by_c = {r["concurrency"]: r["output_tokens_per_s"] for r in res["lora"]}
        if 1 in by_c and 16 in by_c:
            notes.append(f"- lora, 16 clients against 1: {by_c[16] / by_c[1]:.2f}x output tokens/s")
        for other, label in (("same_adapters", "lora against same_adapters"), ("base", "lora against base (composition overhead)"),
                             ("dynamic", "continuous against dynamic batching")):
            if other in res:
                ob = {r["concurrency"]: r["output_tokens_per_s"] for r in res[other]}
                ratios = ", ".join(f"{c} clients {by_c[c] / ob[c]:.2f}x" for c in by_c if c in ob)
                notes.append(f"- {label}: {ratios}")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    sys.exit(main())
