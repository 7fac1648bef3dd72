"""Sibling projections multiplied as one against separately, in the decoding step every entry shares.

    python bench/bench_fused_projections.py --out docs/bench_fused_projections        # about 4 minutes

The embedded SmolLM2 in float32 on oneDNN-packed weights (:mod:`utils.linear_kernels`), with 13 random LoRAs of the
embedded pool's shape (built under ``--work`` when missing). For each batch of ``--batch_sizes`` rows, the median time
of a decoding step (:meth:`utils.decoding.BatchDecoder.step`, no row joining) over ``--steps`` steps after 3 of
warm-up, for ``base`` rows (no adapter) and ``mixture`` rows (row i a top-3 mixture of adapters i, i+1, i+2 of the
pool, the server's grouped LoRA kernel), each with:

    separate   every projection from its own packed weight (``use_linear_kernels(model, "onednn", fuse=False)``)
    fused      q/k/v and gate/up each from one packed weight (:class:`utils.linear_kernels.FusedProjections`, the default)

Configurations run interleaved, ``--repeats`` times, and the fastest median is kept. "same tokens" compares every
row's greedy tokens under the two; "same logits" whether the step's logits were equal bit for bit.
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
from utils.linear_kernels import use_linear_kernels  # noqa: E402

logger = logging.getLogger("bench")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lora_retriever_bench_pool")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt_tokens", type=int, default=60)
    p.add_argument("--out", default="docs/bench_fused_projections", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tok, pool, names = embedded_random_pool(Path(args.work))
    model = pool.model
    live = LiveComposition(pool, grouped=True)
    gen = torch.Generator().manual_seed(0)

    def run(rows: str, fuse: bool, prompts: list[list[int]]):
        use_linear_kernels(model, "onednn", fuse=fuse)
        return step_times(model, tok, live, [(ids, [] if rows == "base" else [names[(i + j) % len(names)] for j in range(3)])
                                             for i, ids in enumerate(prompts)], args.steps)

    def logits(fuse: bool, prompts: list[list[int]]) -> torch.Tensor:
        use_linear_kernels(model, "onednn", fuse=fuse)
        with torch.inference_mode():
            return model(input_ids=torch.tensor(prompts)).logits

    rows = []
    for b in args.batch_sizes:
        prompts = [torch.randint(100, 40000, (args.prompt_tokens,), generator=gen).tolist() for _ in range(b)]
        same_logits = torch.equal(logits(False, prompts), logits(True, prompts))
        for kind in ("base", "mixture"):
            best: dict[bool, float] = {}
            tokens = {}
            for _ in range(args.repeats):
                for fuse in (False, True):
                    ms, toks = run(kind, fuse, prompts)
                    best[fuse] = min(best.get(fuse, ms), ms)
                    tokens[fuse] = toks
            row = {"rows": b, "kind": kind, "separate_ms": round(best[False], 2), "fused_ms": round(best[True], 2),
                   "same_tokens": tokens[False] == tokens[True], "same_prefill_logits": same_logits}
            logger.info("%s", row)
            rows.append(row)
    use_linear_kernels(model, "onednn")
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": "embedded:smollm2-135m-instruct",
              "dtype": "float32", "steps": args.steps, "rows": rows}
    lines = ["| rows | adapters | separate projections | fused | fused / separate | same tokens | same logits (prefill) |",
             "|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['rows']} | {'none' if r['kind'] == 'base' else 'top-3 mixture'} | {r['separate_ms']} ms | "
                     f"{r['fused_ms']} ms | {r['fused_ms'] / r['separate_ms']:.3f} | {'yes' if r['same_tokens'] else 'no'} | "
                     f"{'yes' if r['same_prefill_logits'] else 'no'} |")
    lines += ["", f"{result['cpu']}, {result['threads']} threads; SmolLM2-135M in float32, median of {args.steps} "
              f"decoding steps, best of {args.repeats}."]
    write_result(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
