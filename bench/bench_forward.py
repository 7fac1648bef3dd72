"""Cost of composition inside one forward, without generate(): the op itself and whole-model forwards.

    python bench/bench_forward.py --out docs/bench_forward.json

Part 1 times the per-layer composition op (``bmm`` down to k*r, then ``baddbmm`` up) at SmolLM2's width (576) for a
decoding step (one token per row) and a prompt (250 tokens per row), in bfloat16 as one fused op and in float32 on
the same factors with the input cast (the path a CPU decoding step of a bf16 model takes).
Part 2 times whole forwards of the embedded SmolLM2 with the trained pool: a prompt of 16 x 250 tokens and one
decoding step of 16 rows, base model against mixture and fusion at k = 3, in float32 and bfloat16; configurations
are interleaved and the fastest of ``--repeats`` is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.adapter_pool import AdapterPool  # noqa: E402
from utils.composition import compose  # noqa: E402
from utils.data import load_pool_config  # noqa: E402
from utils.model_loading import load_base_model  # noqa: E402

logger = logging.getLogger("bench")


def best_time(fn, repeats: int, inner: int) -> float:
    """Fastest mean seconds per call over ``repeats`` rounds of ``inner`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def op_timings(width: int, repeats: int) -> list[dict]:
    out = []
    for b, t, kr in [(1, 1, 24), (16, 1, 24), (8, 250, 24), (8, 250, 8)]:
        x = torch.randn(b, t, width, dtype=torch.bfloat16)
        y = torch.randn(b, t, width, dtype=torch.bfloat16)
        A, B = torch.randn(b, width, kr, dtype=torch.bfloat16), torch.randn(b, kr, width, dtype=torch.bfloat16)
        A32, B32 = A.float(), B.float()
        inner = 500 if t == 1 else 10
        fused = best_time(lambda: torch.baddbmm(y, torch.bmm(x, A), B), repeats, inner)
        cast = best_time(lambda: y + torch.bmm(torch.bmm(x.float(), A32), B32).to(y.dtype), repeats, inner)
        out.append({"rows": b, "tokens": t, "k_times_r": kr, "bf16_fused_us": round(fused * 1e6, 1), "fp32_cast_us": round(cast * 1e6, 1)})
        logger.info("op b=%d t=%d k*r=%d: bf16 fused %.1f us, float32 with casts %.1f us", b, t, kr, fused * 1e6, cast * 1e6)
    return out


def forward_timings(repeats: int) -> list[dict]:
    out = []
    entries = load_pool_config("config/bigbench_pool.json")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 40000, (16, 250), generator=g)
    step = torch.randint(10, 40000, (16, 1), generator=g)
    idx = torch.randint(0, len(entries), (16, 3), generator=g)
    w = torch.full((16, 3), 1 / 3)
    for dtype in ("float32", "bfloat16"):
        pool = AdapterPool(load_base_model("embedded:smollm2-135m-instruct", dtype=dtype), entries, show_progress=False)
        best = {}
        with torch.inference_mode():
            for _ in range(repeats):
                for mode in ("base", "mixture", "fusion"):
                    for name, ids, inner in (("prompt 16x250", prompt, 1), ("decoding step 16x1", step, 10)):
                        if mode == "base":
                            s = best_time(lambda: pool.model(input_ids=ids), 1, inner)
                        else:
                            with compose(pool, idx, w, mode) as m:
                                s = best_time(lambda: m(input_ids=ids), 1, inner)
                        key = (mode, name)
                        best[key] = min(best.get(key, float("inf")), s)
        for (mode, name), s in best.items():
            out.append({"dtype": dtype, "mode": mode, "input": name, "ms": round(s * 1e3, 2)})
            logger.info("%s %-8s %-20s %.2f ms", dtype, mode, name, s * 1e3)
        del pool
    return out


def markdown(ops: list[dict], forwards: list[dict]) -> str:
    lines = ["| rows x tokens | k*r | bf16, one fused op (us) | float32 on the same factors, input cast (us) |", "|---|---:|---:|---:|"]
    lines += [f"| {o['rows']} x {o['tokens']} | {o['k_times_r']} | {o['bf16_fused_us']} | {o['fp32_cast_us']} |" for o in ops]
    lines += ["", "| dtype | input | base (ms) | mixture k=3 (ms) | fusion k=3 (ms) |", "|---|---|---:|---:|---:|"]
    for dtype in ("float32", "bfloat16"):
        for name in ("prompt 16x250", "decoding step 16x1"):
            ms = {f["mode"]: f["ms"] for f in forwards if f["dtype"] == dtype and f["input"] == name}
            if ms:
                lines.append(f"| {dtype} | {name} | {ms['base']} | {ms['mixture']} | {ms['fusion']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_model", action="store_true", help="only the op timings (no model forwards)")
    p.add_argument("--out", default="docs/bench_forward.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ops = op_timings(576, args.repeats)
    forwards = [] if args.skip_model else forward_timings(args.repeats)
    md = markdown(ops, forwards)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".md").write_text(md)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                          "ops": ops, "forwards": forwards}, indent=1))
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
