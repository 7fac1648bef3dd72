"""Serving throughput while the server trains a new adapter (POST /v1/adapters/train), against without a job.

    python bench/bench_training_load.py                  # embedded SmolLM2, 4 clients; writes docs/bench_training_load.{json,md}

For each way of running the training (a ``serve.py`` flag set), one server is started on the embedded model with a
pool of 13 LoRAs of the embedded pool's shape (random factors, the suite's cards, as ``bench/bench_vs_vllm.py
--random_pool``). ``--clients`` clients send the suite's mixed rows (``model: auto``, exactly ``--max_tokens`` tokens
each, ``ignore_eos``) for ``--seconds`` without a job, then for ``--seconds`` while a job trains a LoRA on a suite
task's training rows (long enough to outlast the window; cancelled afterwards). Throughput is output tokens per
second over each window; the training job's own pace (steps per second) is read from its state.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_helpers import free_port, random_pool, stop, wait_for  # noqa: E402

VARIANTS = {  # name: (what it is, serve.py flags)
    "nice10": ("a process of 1 thread at nice 10 (the default)", ["--training_threads", "1", "--training_nice", "10"]),
    "nice0": ("a process of 1 thread at the server's priority", ["--training_threads", "1", "--training_nice", "0"]),
    "threads2": ("a process of 2 threads at the server's priority", ["--training_threads", "2", "--training_nice", "0"]),
}


def load(url: str, rows: list[dict], clients: int, seconds: float, max_tokens: int) -> dict:
    stop = time.time() + seconds
    tokens, requests, errors = [0], [0], [0]
    lock = threading.Lock()

    def client(i: int):
        rng = random.Random(i)
        with httpx.Client(timeout=300) as http:
            while time.time() < stop:
                row = rng.choice(rows)
                r = http.post(url + "/v1/completions", json={"model": "auto", "prompt": row["inputs"], "max_tokens": max_tokens,
                                                             "ignore_eos": True, "temperature": 0})
                with lock:
                    if r.status_code == 200:
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                        requests[0] += 1
                    else:
                        errors[0] += 1

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    return {"tokens_per_s": round(tokens[0] / elapsed, 2), "requests": requests[0], "errors": errors[0], "seconds": round(elapsed, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60.0, help="each measuring window")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the first window (adapters read, caches warm)")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--task", default="sports_understanding", help="the suite task whose training rows the job trains on")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="docs/bench_training_load")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_training_load_"))
    config = random_pool(work / "pool", "embedded:smollm2-135m-instruct")
    rows = json.loads((ROOT / "data" / "bigbench" / "combined_test.json").read_text())
    train = json.loads((ROOT / "data" / "bigbench" / "train" / f"{args.task}.json").read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = {"command": "python bench/bench_training_load.py " + " ".join(sys.argv[1:] if argv is None else argv), "clients": args.clients,
           "max_tokens": args.max_tokens, "cores": os.cpu_count(), "results": {}}
    for name in args.variants:
        port = free_port()
        log = work / f"serve_{len(out['results'])}.log"
        proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--config_path", str(config), "--prompt_format", "raw",
                                 "--training_root", str(work / f"trained{len(out['results'])}"), *VARIANTS[name][1]],
                                cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(url + "/health", proc, log)
            load(url, rows, args.clients, args.warmup, args.max_tokens)
            idle = load(url, rows, args.clients, args.seconds, args.max_tokens)
            job = httpx.post(url + "/v1/adapters/train", json={"name": f"new_{args.task}", "domain": "new", "examples": train,
                                                                "settings": {"steps": 100000}}, timeout=60).json()
            deadline = time.time() + 300
            while httpx.get(f"{url}/v1/adapters/train/{job['id']}").json()["step"] < 1 and time.time() < deadline:
                time.sleep(0.5)
            s0 = httpx.get(f"{url}/v1/adapters/train/{job['id']}").json()
            busy = load(url, rows, args.clients, args.seconds, args.max_tokens)
            s1 = httpx.get(f"{url}/v1/adapters/train/{job['id']}").json()
            httpx.delete(f"{url}/v1/adapters/train/{job['id']}", timeout=60)
            pace = (s1["step"] - s0["step"]) / max(s1["elapsed_s"] - s0["elapsed_s"], 1e-9)
            out["results"][name] = {"without_job": idle, "during_job": busy, "training_steps_per_s": round(pace, 3),
                                    "cost": round(1 - busy["tokens_per_s"] / idle["tokens_per_s"], 3)}
            print(name, json.dumps(out["results"][name]), flush=True)
        finally:
            stop(proc)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    lines = [f"| training runs as | {args.clients} clients, no job: out tok/s | during a job: out tok/s | cost | training steps/s |",
             "|---|---:|---:|---:|---:|"]
    for name, r in out["results"].items():
        lines.append(f"| {VARIANTS[name][0]} (`{name}`) | {r['without_job']['tokens_per_s']:.1f} | {r['during_job']['tokens_per_s']:.1f} | "
                     f"{100 * r['cost']:.0f}% | {r['training_steps_per_s']:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
