"""The linear layers' kernels on this CPU: PyTorch's F.linear against oneDNN, from a dense and from a packed weight.

    python bench/bench_linear_kernels.py --out docs/bench_linear_kernels      # writes OUT.{json,md}; about 2 minutes

Every linear weight of SmolLM2-135M (30 layers of q, k, v, o, gate, up, down, and the 49,152 x 576 head: 211
matrices, 513 MiB in float32), random, each multiplied once by ``rows`` rows, as one forward of the model would (the
weights do not stay in cache between two uses). Kernels:

    F.linear        torch.nn.functional.linear (a BLAS GEMM that packs the weight at every call)
    onednn dense    torch.ops.mkldnn._linear_pointwise on the plain weight
    onednn packed   the same on a copy packed once by torch.ops.mkldnn._reorder_linear_weight, with a batch hint of
                    1 or none (what utils/linear_kernels.py uses)

Milliseconds per pass over all 211, the fastest of ``--repeats`` interleaved measurements of ``--iters`` passes;
bfloat16 only where the CPU has bf16 instructions.
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

from bench.bench_helpers import cpu_name  # noqa: E402
from utils.linear_kernels import onednn_supports  # noqa: E402

logger = logging.getLogger("bench")
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # SmolLM2 layer


def timed(fn, iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256], help="rows per multiplication (256: a prompt)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="docs/bench_linear_kernels")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not onednn_supports(torch.float32):
        raise SystemExit("This PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False).")
    torch.manual_seed(0)
    linear = torch.nn.functional.linear

    def onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    results = []
    for dtype in [d for d in (torch.float32, torch.bfloat16) if onednn_supports(d)]:
        weights = [torch.randn(o, i, dtype=dtype) * 0.02 for _ in range(args.layers) for o, i in SHAPES]
        weights.append(torch.randn(49152, 576, dtype=dtype) * 0.02)
        packed = {"onednn packed, hint 1": [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights],
                  "onednn packed, no hint": [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]}
        for rows in args.rows:
            xs = {576: torch.randn(rows, 576, dtype=dtype), 1536: torch.randn(rows, 1536, dtype=dtype)}
            kernels = {"F.linear": (linear, weights), "onednn dense": (onednn, weights),
                       **{name: (onednn, ws) for name, ws in packed.items()}}
            best = {name: float("inf") for name in kernels}
            for _ in range(args.repeats):
                for name, (fn, ws) in kernels.items():
                    best[name] = min(best[name], timed(lambda: [fn(xs[w.shape[1]], w) for w in ws], args.iters))
            row = {"dtype": str(dtype).replace("torch.", ""), "rows": rows, "ms": {k: round(v, 1) for k, v in best.items()}}
            logger.info("%s", row)
            results.append(row)
    names = list(results[0]["ms"])
    lines = ["| dtype | rows | " + " | ".join(names) + " | F.linear / packed, no hint |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for r in results:
        ratio = r["ms"]["F.linear"] / r["ms"]["onednn packed, no hint"]
        lines.append(f"| {r['dtype']} | {r['rows']} | " + " | ".join(f"{r['ms'][n]:.1f}" for n in names) + f" | {ratio:.2f}x |")
    cpu = f"{cpu_name()}, {torch.get_num_threads()} threads"
    lines += ["", f"Milliseconds per pass over the 211 weights; {cpu}."]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"cpu": cpu, "results": results}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
