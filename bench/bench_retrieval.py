"""Retrieval at scale: embedding and search time per query for pools of 48 to 100k adapter vectors.

    python bench/bench_retrieval.py --pool_sizes 48 1000 10000 100000 --queries 256 --out docs/bench_retrieval.json

Queries are the embedded suite's test inputs (embedded with all-MiniLM-L6-v2 in batches); pool vectors are
synthetic unit vectors of the same dimension (384), except that the real suite pool is used at size 13.
Reports embedding ms/query (batched and one at a time) and search ms/query for the exact flat index and,
from 10k adapters up, HNSW (build time and recall@1 against the exact index).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.data import load_rows  # noqa: E402
from utils.retrieval import Embedder, build_index  # noqa: E402

logger = logging.getLogger("bench_retrieval")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool_sizes", type=int, nargs="+", default=[48, 1000, 10000, 100000])
    p.add_argument("--queries", type=int, default=195)
    p.add_argument("--data_path", default="data/bigbench/combined_test.json")
    p.add_argument("--out", default="docs/bench_retrieval.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    texts = [r["inputs"] for r in load_rows(args.data_path)][: args.queries]
    emb = Embedder("embedded:all-minilm-l6-v2")
    emb.encode(texts[:8])  # warm-up
    t0 = time.perf_counter()
    q = emb.encode(texts)
    batched_ms = 1000 * (time.perf_counter() - t0) / len(texts)
    t0 = time.perf_counter()
    for t in texts[:32]:
        emb.encode([t])
    single_ms = 1000 * (time.perf_counter() - t0) / 32
    logger.info("embedding: %.2f ms/query batched, %.2f ms/query one at a time", batched_ms, single_ms)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.pool_sizes:
        vecs = rng.standard_normal((n, q.shape[1])).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        kinds = ["flat"] + (["hnsw"] if n >= 10000 else [])
        exact = None
        for kind in kinds:
            t0 = time.perf_counter()
            index = build_index(vecs, kind)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, ids = index.search(q, 5)
            search_ms = 1000 * (time.perf_counter() - t0) / len(q)
            recall = None
            if kind == "flat":
                exact = ids
            else:
                recall = float((ids[:, 0] == exact[:, 0]).mean())
            rows.append({"pool": n, "index": kind, "build_s": round(build_s, 3), "search_ms_per_query": round(search_ms, 4),
                         "recall_at_1_vs_flat": recall})
            logger.info("pool %6d %-5s build %.2f s, search %.4f ms/query%s", n, kind, build_s, search_ms,
                        f", recall@1 {recall:.3f}" if recall is not None else "")
    out = {"queries": len(texts), "dim": int(q.shape[1]), "embed_ms_per_query_batched": round(batched_ms, 3),
           "embed_ms_per_query_single": round(single_ms, 3), "search": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
