"""A decoding step on the thread that loaded the model, on another thread, and on another thread once the loading
thread has released its OpenMP workers (:mod:`utils.cpu_threads`): what a server's scheduler thread pays when two
OpenMP pools share the cores.

    python bench/profile_threads.py --out docs/profile_threads        # about 1 minute on 2 CPU cores

The step is :meth:`utils.decoding.BatchDecoder.step` on the embedded SmolLM2 in float32 (base rows, prompts of
``--prompt_tokens`` tokens, ``--warmup`` steps first); each figure is the median of ``--steps`` steps. Order of the
runs: the loading (main) thread; a new thread while the main thread's pool is alive; the main thread again; then
the main thread releases its pool and a new thread runs once more. Each new thread ends before the next run starts
(its pool goes with it).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_helpers import cpu_name, write_result  # noqa: E402
from utils.cpu_threads import release_openmp_pool  # noqa: E402
from utils.decoding import BatchDecoder, Sequence  # noqa: E402
from utils.model_loading import load_base_model, load_tokenizer  # noqa: E402

logger = logging.getLogger("bench")


def step_ms(model, tok, rows: int, args) -> float:
    decoder = BatchDecoder(model, tok, None, context_length=4096, live_text=False)
    seqs = [Sequence(prompt_ids=torch.randint(100, 40000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(i)).tolist(),
                     max_new_tokens=args.warmup + args.steps + 4, ignore_eos=True) for i in range(rows)]
    decoder.add(seqs)
    for _ in range(args.warmup):
        decoder.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        decoder.step()
        times.append(time.perf_counter() - t0)
    decoder.reset()
    return round(1000 * statistics.median(times), 2)


def on_new_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="docs/profile_threads", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    model = load_base_model("embedded:smollm2-135m-instruct", dtype="float32", device="cpu")
    rows = []
    for b in args.batch_sizes:
        r = {"batch": b, "threads": torch.get_num_threads()}
        r["loading thread"] = step_ms(model, tok, b, args)
        r["other thread, two pools"] = on_new_thread(lambda: step_ms(model, tok, b, args))
        r["loading thread again"] = step_ms(model, tok, b, args)
        r["released"] = release_openmp_pool()
        r["other thread, loading thread's pool released"] = on_new_thread(lambda: step_ms(model, tok, b, args))
        logger.info("%s", r)
        rows.append(r)
        step_ms(model, tok, 1, args)  # the main thread's pool back for the next batch size
    result = {"cpu": cpu_name(), "model": "embedded:smollm2-135m-instruct", "dtype": "float32", "rows": rows}
    cols = ["loading thread", "other thread, two pools", "loading thread again", "other thread, loading thread's pool released"]
    lines = ["| rows | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    lines += [f"| {r['batch']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    lines += ["", f"Milliseconds per decoding step (median of {args.steps}); {result['cpu']}, {rows[0]['threads']} threads."]
    write_result(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
