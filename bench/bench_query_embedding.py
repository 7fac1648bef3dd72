"""Embedding a group of queries at once, by the size of the batches they are cut into.

    python bench/bench_query_embedding.py --out docs/bench_query_embedding        # about 1 minute

The embedded retriever (all-MiniLM-L6-v2, with the paper's instruction) on the embedded suite's test inputs, shuffled:
for ``--groups`` queries arriving together (what a server embeds between two decoding steps), the time of one
:meth:`Embedder.encode` call with ``batch_size`` each of ``--batch_sizes`` (best of ``--repeats``), and the largest
difference of any embedding from the one batch_size 64 gives. sentence-transformers sorts a call's texts by length and
pads each batch to its longest text, so one large batch of mixed lengths computes mostly padding.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_helpers import cpu_name, write_result  # noqa: E402
from utils.retrieval import Embedder  # noqa: E402

logger = logging.getLogger("bench")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retriever", default="embedded:all-minilm-l6-v2")
    p.add_argument("--data_path", default="data/bigbench/combined_test.json")
    p.add_argument("--groups", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 16, 8, 4, 1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="docs/bench_query_embedding", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = json.loads(Path(args.data_path).read_text())
    random.Random(0).shuffle(rows)
    texts = [r["inputs"] for r in rows]
    emb = Embedder(args.retriever)
    emb.encode(texts[:8], cache=False)  # load and warm up
    results = []
    start = 0
    for n in args.groups:
        group = texts[start:start + n]
        start += n
        ref = None
        for bs in args.batch_sizes:
            emb.batch_size = bs
            best, out = float("inf"), None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = emb.encode(group, cache=False)
                best = min(best, time.perf_counter() - t0)
            ref = out if ref is None else ref
            row = {"queries": n, "batch_size": bs, "ms": round(1000 * best, 1), "ms_per_query": round(1000 * best / n, 2),
                   "max_diff": float(np.abs(out - ref).max())}
            logger.info("%s", row)
            results.append(row)
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "retriever": args.retriever, "rows": results}
    lines = ["| queries together | batch_size | ms | ms per query | largest difference from batch_size 64 |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['queries']} | {r['batch_size']} | {r['ms']} | {r['ms_per_query']} | {r['max_diff']:.1e} |" for r in results]
    lines += ["", f"{result['cpu']}, {result['threads']} threads; {args.retriever}, the paper's instruction, best of {args.repeats}."]
    write_result(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
