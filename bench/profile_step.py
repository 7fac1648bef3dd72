"""Where one decoding step of the server's decoder spends its time, at batch 1, 16 and 32, base and composed.

    python bench/profile_step.py --out docs/profile_step        # writes docs/profile_step.{json,md}
    python bench/profile_step.py --linear_kernels torch onednn --out docs/profile_step_kernels

The step is the server's own (:class:`utils.decoding.BatchDecoder.step`, the path every request
takes) on the embedded SmolLM2 in float32 with the pool of ``--config_path``: ``base`` rows use no adapter,
``mixture`` rows a top-3 mixture of different adapters per row (the composition hooks of
:class:`utils.composition.LiveComposition`). Each batch is prefilled with prompts of ``--prompt_tokens`` tokens and
decodes ``--warmup`` steps before ``--steps`` steps are profiled with ``torch.profiler`` (CPU); configurations run
``--repeats`` times, interleaved, and the fastest is kept (the first batch of a size pays for fresh memory as its KV
cache grows). ``--linear_kernels`` profiles each configuration with each kernel of the linear layers
(:mod:`utils.linear_kernels`), interleaved too. The operators' own
(self) CPU time is grouped:

    matmul       the projections and the LM head (aten::mm, addmm, linear, matmul, bmm, baddbmm; oneDNN's
                 mkldnn::_linear_pointwise from packed weights)
    attention    scaled dot-product attention and softmax
    cache        growing the KV cache and the mask (cat, copy, index, pad)
    elementwise  norms, activations, rotary embeddings, adds and multiplies
    sampling     picking the next token (argmax, topk, log_softmax of the logits)
    other ops    every other operator
    outside ops  the step's wall time not spent inside any operator: Python, dispatch, hooks' own Python

so that the next change to the step can aim at what the profile shows.
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
from utils.composition import LiveComposition  # noqa: E402
from utils.data import load_pool_config  # noqa: E402
from utils.flags import LINEAR_KERNEL_CHOICES  # noqa: E402
from utils.linear_kernels import use_linear_kernels  # noqa: E402
from utils.model_loading import load_base_model, load_tokenizer  # noqa: E402
from utils.decoding import BatchDecoder, Sequence  # noqa: E402

logger = logging.getLogger("bench")
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "aten::baddbmm",
               "mkldnn::_linear_pointwise"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::softmax", "aten::_softmax"),
    "cache": ("aten::cat", "aten::copy_", "aten::index", "aten::pad", "aten::constant_pad_nd", "aten::index_select",
              "aten::slice", "aten::narrow", "aten::clone"),
    "elementwise": ("aten::mul", "aten::add", "aten::rsqrt", "aten::pow", "aten::mean", "aten::silu", "aten::neg", "aten::cos",
                    "aten::sin", "aten::to", "aten::_to_copy", "aten::div", "aten::sub"),
    "sampling": ("aten::argmax", "aten::topk", "aten::log_softmax", "aten::_log_softmax", "aten::max"),
}


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if any(name == n or name.startswith(n + "_") for n in names):
            return group
    return "other ops"


def profile(decoder: BatchDecoder, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.step()
        wall = (time.perf_counter() - t0) / steps
    by_group: dict[str, float] = {}
    for e in prof.key_averages():
        by_group[group_of(e.key)] = by_group.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6 / steps
    ops = sum(by_group.values())
    by_group["outside ops"] = max(wall - ops, 0.0)
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {"step_ms": round(wall * 1000, 2), "ms": {k: round(v * 1000, 2) for k, v in sorted(by_group.items())},
            "top_ops": [(e.key, round(e.self_cpu_time_total / 1000 / steps, 3), e.count // steps) for e in top]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="config/bigbench_pool.json", help="the pool (its adapters must exist)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 32], help="rows decoded together")
    p.add_argument("--prompt_tokens", type=int, default=128, help="prompt length of every row")
    p.add_argument("--warmup", type=int, default=8, help="steps decoded before profiling (the cache has grown by this many)")
    p.add_argument("--steps", type=int, default=16, help="steps profiled")
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved; the fastest is kept")
    p.add_argument("--modes", nargs="+", default=["base", "mixture"], choices=("base", "mixture"), help="rows, in the order profiled")
    p.add_argument("--linear_kernels", nargs="+", default=["auto"], choices=LINEAR_KERNEL_CHOICES,
                   help="kernels of the linear layers to profile, interleaved (utils/linear_kernels.py)")
    p.add_argument("--out", default="docs/profile_step", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    model = load_base_model("embedded:smollm2-135m-instruct", dtype="float32", device="cpu")
    entries = load_pool_config(args.config_path)
    pool = AdapterPool(model, entries, show_progress=False)
    names = [e.name for e in entries]
    composition = LiveComposition(pool)
    results = []
    with composition.active():
        for b in args.batch_sizes:
            # The first batch of a size pays for fresh memory as its KV cache grows (page faults in aten::cat and copy):
            # every configuration runs --repeats times, interleaved, and the fastest step is kept.
            best: dict[tuple, dict] = {}
            for kernels, mode in [(k, m) for _ in range(args.repeats) for k in args.linear_kernels for m in args.modes]:
                used = use_linear_kernels(model, kernels)
                decoder = BatchDecoder(model, tok, composition, context_length=4096)
                seqs = []
                for i in range(b):
                    ids = torch.randint(100, 40000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(i)).tolist()
                    adapters = [names[(i + j) % len(names)] for j in range(3)] if mode == "mixture" else []
                    seqs.append(Sequence(prompt_ids=ids, max_new_tokens=args.warmup + args.steps + 4, adapters=adapters,
                                         adapter_w=[1 / 3] * len(adapters), ignore_eos=True))
                decoder.add(seqs)
                for _ in range(args.warmup):
                    decoder.step()
                r = profile(decoder, args.steps)
                r.update(batch=b, mode=mode, threads=torch.get_num_threads(), linear_kernels=used)
                logger.info("batch %d %s, %s linears: %.1f ms per step %s", b, mode, used, r["step_ms"], r["ms"])
                if (used, mode) not in best or r["step_ms"] < best[used, mode]["step_ms"]:
                    best[used, mode] = r
                decoder.reset()
                composition.forget([s.serial for s in seqs])
            results += [best[key] for key in best]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    groups = ["matmul", "attention", "cache", "elementwise", "sampling", "other ops", "outside ops"]
    lines = ["| batch | rows | linears | ms per step | " + " | ".join(groups) + " |", "|---:|---|---|---:|" + "---:|" * len(groups)]
    for r in results:
        lines.append(f"| {r['batch']} | {r['mode']} | {r['linear_kernels']} | {r['step_ms']} | " + " | ".join(f"{r['ms'].get(g, 0.0):.2f}" for g in groups) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
