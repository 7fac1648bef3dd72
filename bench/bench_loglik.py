"""Log-likelihood requests, as lm-evaluation-harness sends them, against the server with each linear-layer kernel.

    python bench/bench_loglik.py --out docs/bench_loglik          # writes OUT.{json,md}; about 3 minutes

lm-eval's ``local-completions`` model scores a continuation by one completions request per (context, continuation):
``prompt`` = context + continuation, ``max_tokens`` 0, ``echo`` true, ``logprobs`` 1; the server answers from the
logits of one prefill (``utils/decoding.py``, prompt logprobs). This script sends the suite's rows that way (the
row's prompt as the context, its target as the continuation), ``--clients`` at a time, to two real ``serve.py``
processes on the embedded base model (``--no_adapters``): ``--linear_kernels torch`` and ``onednn``
(``utils/linear_kernels.py``). Each server is measured ``--repeats`` times, alternating; the fastest run is kept.
Both must return the same log-likelihoods up to float rounding: the largest difference is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_helpers import cpu_name, free_port, stop, wait_for  # noqa: E402

logger = logging.getLogger("bench")


async def score_all(url: str, texts: list[str], clients: int) -> tuple[float, list[float]]:
    """Seconds to score every text, and each text's summed prompt log-likelihood (first token excluded)."""
    results: list[float] = [0.0] * len(texts)
    todo = list(range(len(texts)))
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            while todo:
                i = todo.pop(0)
                r = await client.post(f"{url}/v1/completions", json={
                    "model": "base", "prompt": texts[i], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
                r.raise_for_status()
                lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
                results[i] = sum(x for x in lps if x is not None)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="data/bigbench/combined_test.json")
    p.add_argument("--rows", type=int, default=64, help="requests per run (the suite's first rows, shuffled with seed 0)")
    p.add_argument("--clients", type=int, default=4, help="concurrent requests")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="docs/bench_loglik")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    import random

    from utils.prompter import Prompter

    rows = json.loads((ROOT / args.data_path).read_text(encoding="utf-8"))
    random.Random(0).shuffle(rows)
    prompter = Prompter("alpaca")
    texts = [prompter.generate_prompt(r["inputs"]) + str(r["targets"]) for r in rows[:args.rows]]
    work = Path(tempfile.mkdtemp(prefix="bench_loglik_"))
    servers = {}
    try:
        for kernels in ("torch", "onednn"):
            port = free_port()
            log = work / f"serve_{kernels}.log"
            proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--no_adapters", "--linear_kernels", kernels],
                                    cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            servers[kernels] = (f"http://127.0.0.1:{port}", proc)
            wait_for(f"http://127.0.0.1:{port}/health", proc, log)
        best: dict[str, float] = {}
        scores: dict[str, list[float]] = {}
        asyncio.run(score_all(servers["torch"][0], texts[:4], 1))  # warm-up of both
        asyncio.run(score_all(servers["onednn"][0], texts[:4], 1))
        for _ in range(args.repeats):
            for kernels, (url, _) in servers.items():
                seconds, scores[kernels] = asyncio.run(score_all(url, texts, args.clients))
                best[kernels] = min(best.get(kernels, float("inf")), seconds)
                logger.info("%s: %d requests in %.1f s", kernels, len(texts), seconds)
    finally:
        for _, proc in servers.values():
            stop(proc)
    diff = max(abs(a - b) for a, b in zip(scores["torch"], scores["onednn"]))
    out = {"cpu": cpu_name(), "rows": len(texts), "clients": args.clients, "seconds": {k: round(v, 2) for k, v in best.items()},
           "requests_per_s": {k: round(len(texts) / v, 2) for k, v in best.items()}, "max_abs_loglik_diff": diff}
    lines = ["| linear kernels | seconds | requests/s |", "|---|---:|---:|"]
    lines += [f"| {k} | {out['seconds'][k]:.1f} | {out['requests_per_s'][k]:.2f} |" for k in best]
    lines += ["", f"{len(texts)} log-likelihood requests, {args.clients} at a time; {out['cpu']}; onednn/torch "
              f"{best['torch'] / best['onednn']:.2f}x; largest difference of a summed log-likelihood {diff:.2e}."]
    Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
