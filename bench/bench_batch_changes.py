"""What a change of a server's batch costs the per-row composition: :meth:`LiveComposition.set_rows` after a row
leaves and after one joins, the way the decoder changes its batch (the last row takes the place of the one that
left; a joining row's prefill sets its own group first, then the next step the whole batch).

    python bench/bench_batch_changes.py --out docs/bench_batch_changes        # about 20 seconds
    python bench/bench_batch_changes.py --lora_kernel grouped --out docs/bench_batch_changes_grouped

The embedded SmolLM2 in float32 with ``--pool`` (default: 13 random LoRAs of the embedded pool's shape, r 8 on
q_proj/v_proj, built under ``--work`` when missing), a batch of ``--rows`` rows, each a top-3 mixture of different
adapters; ``--changes`` rounds of one row leaving (at a random place) and one joining. Medians in milliseconds:

    step after a change     set_rows for the whole batch, after a row left or joined
    prefill of a joining row set_rows for the joining row alone (its factors are built there)

With ``--lora_kernel grouped`` (the server's default), a batch that shares its adapters changes only its mask, and a
joining row's own factors are built for its prefill alone (a row alone is not grouped).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_helpers import cpu_name, random_pool  # noqa: E402
from utils.adapter_pool import AdapterPool  # noqa: E402
from utils.composition import LiveComposition  # noqa: E402
from utils.data import load_pool_config  # noqa: E402
from utils.model_loading import load_base_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", default=None, help="pool config (default: 13 random LoRAs built under --work)")
    p.add_argument("--work", default="/tmp/lora_retriever_bench_pool")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--lora_kernel", default="per_row", choices=("per_row", "grouped"))
    p.add_argument("--out", default="docs/bench_batch_changes", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    base = "embedded:smollm2-135m-instruct"
    config = args.pool or str(random_pool(Path(args.work), base))
    model = load_base_model(base, dtype="float32", device="cpu")
    entries = load_pool_config(config)
    pool = AdapterPool(model, entries, show_progress=False)
    names = [e.name for e in entries]
    live = LiveComposition(pool, grouped=args.lora_kernel == "grouped")

    def row(serial: int):
        return (serial, [names[(serial + j) % len(names)] for j in range(3)], [1 / 3] * 3, "mixture")

    def timed(rows) -> float:
        t0 = time.perf_counter()
        live.set_rows(rows)
        return 1000 * (time.perf_counter() - t0)

    key = list(range(args.rows))
    live.set_rows([row(s) for s in key])
    serial, rnd = args.rows, random.Random(0)
    steps, prefills = [], []
    for _ in range(args.changes):
        place = rnd.randrange(len(key))
        live.forget([key[place]])
        key[place] = key[-1]
        key.pop()
        steps.append(timed([row(s) for s in key]))
        prefills.append(timed([row(serial)]))
        key.append(serial)
        serial += 1
        steps.append(timed([row(s) for s in key]))
    live.forget(key)
    result = {"cpu": cpu_name(), "lora_kernel": args.lora_kernel, "grouped_batches": live.shared_forwards, "rows": args.rows, "changes": args.changes, "modules": len(live.pool.targets),
              "step_after_change_ms": round(statistics.median(steps), 2),
              "prefill_of_joining_row_ms": round(statistics.median(prefills), 2)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["| rows | step after a change (ms) | prefill of a joining row (ms) |", "|---:|---:|---:|",
             f"| {args.rows} | {result['step_after_change_ms']} | {result['prefill_of_joining_row_ms']} |", "",
             f"Medians over {args.changes} leave-and-join rounds; {args.lora_kernel} kernel ({live.shared_forwards} batches "
             f"set up grouped); {result['cpu']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
