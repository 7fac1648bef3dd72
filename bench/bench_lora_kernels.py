"""The two kernels of a server's LoRA products, in its own decoding step: per-row factors against grouped.

    python bench/bench_lora_kernels.py --out docs/bench_lora_kernels        # about 3 minutes

The embedded SmolLM2 in float32 with 13 random LoRAs of the embedded pool's shape (r 8 on q_proj / v_proj, built
under ``--work`` when missing). For each batch of ``--batch_sizes`` rows, each a top-3 mixture of adapters drawn
from the first ``--adapters`` of the pool (row i uses adapters i, i+1, i+2 modulo that count, so a batch's distinct
adapters are min(rows + 2, count)), the median time of a decoding step (:meth:`BatchDecoder.step`, no row joining)
over ``--steps`` steps after 3 of warm-up, for:

    base       the same rows without adapters
    per_row    ``LiveComposition(grouped=False)``: each row's stacked factors, two batched products per module
    grouped    ``LiveComposition(grouped=True)``: one product per module for the batch's distinct adapters, each row's
               weights as a mask (where :meth:`LiveComposition._shared_for` picks it; "kernel used" says which ran)

Configurations run interleaved, ``--repeats`` times, and the fastest median is kept. "same tokens" compares the
greedy tokens of every row under the two kernels.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_helpers import cpu_name, embedded_random_pool, step_times, write_result  # noqa: E402
from utils.composition import LiveComposition  # noqa: E402

logger = logging.getLogger("bench")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lora_retriever_bench_pool")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--adapters", type=int, nargs="+", default=[3, 13], help="adapters the rows draw from")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt_tokens", type=int, default=60)
    p.add_argument("--out", default="docs/bench_lora_kernels", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = "embedded:smollm2-135m-instruct"
    tok, pool, names = embedded_random_pool(Path(args.work))
    model = pool.model
    gen = torch.Generator().manual_seed(0)
    lives = {"per_row": LiveComposition(pool, grouped=False), "grouped": LiveComposition(pool, grouped=True)}

    def run(kind: str, b: int, count: int, prompts: list[list[int]]):
        live = lives.get(kind, lives["per_row"])
        before = live.shared_forwards
        ms, tokens = step_times(model, tok, live, [(prompts[i], [] if kind == "base" else [names[(i + j) % count] for j in range(3)])
                                                   for i in range(b)], args.steps)
        return ms, tokens, live.shared_forwards > before

    rows = []
    for b in args.batch_sizes:
        for count in args.adapters:
            prompts = [torch.randint(100, 40000, (args.prompt_tokens,), generator=gen).tolist() for _ in range(b)]
            best: dict[str, float] = {}
            tokens, used = {}, False
            for _ in range(args.repeats):
                for kind in ("base", "per_row", "grouped"):
                    ms, toks, u = run(kind, b, count, prompts)
                    best[kind] = min(best.get(kind, ms), ms)
                    tokens[kind] = toks
                    used = used or (kind == "grouped" and u)
            row = {"rows": b, "adapters": min(count, b + 2), "base_ms": round(best["base"], 2), "per_row_ms": round(best["per_row"], 2),
                   "grouped_ms": round(best["grouped"], 2), "kernel_used": "grouped" if used else "per_row",
                   "same_tokens": tokens["per_row"] == tokens["grouped"]}
            logger.info("%s", row)
            rows.append(row)
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": base, "dtype": "float32", "steps": args.steps,
              "rows": rows}
    lines = ["| rows | distinct adapters | base step | per-row kernel | grouped kernel | grouped / per-row | kernel used | same tokens |",
             "|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['rows']} | {r['adapters']} | {r['base_ms']} ms | {r['per_row_ms']} ms | {r['grouped_ms']} ms | "
                     f"{r['grouped_ms'] / r['per_row_ms']:.2f} | {r['kernel_used']} | {'yes' if r['same_tokens'] else 'no'} |")
    lines += ["", f"{result['cpu']}, {result['threads']} threads; SmolLM2-135M in float32, top-3 mixtures, median of "
              f"{args.steps} decoding steps, best of {args.repeats}."]
    write_result(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
