"""Building the per-row factors of rows that join a batch together (:meth:`LiveComposition._build`): what a joining
group's prefill waits for under the per-row kernel, and what evaluation pays per batch.

    python bench/bench_row_factors.py --out docs/bench_row_factors        # about 30 seconds

The embedded SmolLM2 in float32 with 13 random LoRAs of the embedded pool's shape (r 8 on q_proj / v_proj, built
under ``--work`` when missing). For ``--rows`` rows joining at once, each a top-3 mixture (row i: adapters i, i+1,
i+2 of the pool), the rows are pinned and their factors built ``--repeats`` times; the median and the fastest build
are reported, in milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_helpers import cpu_name, embedded_random_pool, write_result  # noqa: E402
from utils.composition import LiveComposition  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lora_retriever_bench_pool")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="docs/bench_row_factors", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, pool, names = embedded_random_pool(Path(args.work))
    live = LiveComposition(pool)
    serial = 0
    rows_out = []
    for b in args.rows:
        times = []
        for _ in range(args.repeats):
            rows = [(serial + i, [names[(i + j) % len(names)] for j in range(3)], [1 / 3] * 3, "mixture") for i in range(b)]
            serial += b
            live._pin(rows)
            t0 = time.perf_counter()
            live._build(rows)
            times.append(1000 * (time.perf_counter() - t0))
            live.forget([r[0] for r in rows])
        row = {"rows": b, "median_ms": round(statistics.median(times), 2), "fastest_ms": round(min(times), 2)}
        logging.getLogger("bench").info("%s", row)
        rows_out.append(row)
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows_out}
    lines = ["| rows joining | median | fastest |", "|---:|---:|---:|"]
    lines += [f"| {r['rows']} | {r['median_ms']} ms | {r['fastest_ms']} ms |" for r in rows_out]
    lines += ["", f"{result['cpu']}, {result['threads']} threads; SmolLM2-135M's 60 q_proj/v_proj, r 8, top-3 mixtures; "
              f"{args.repeats} builds each."]
    write_result(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
