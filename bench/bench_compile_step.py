"""torch.compile of a decoding step on CPU, against the same step eager: what compiling would buy, and cost.

    python bench/bench_compile_step.py --out docs/bench_compile_step        # about 8 minutes on 2 CPU cores

The embedded SmolLM2 in float32, ``--batch`` rows prefilled with ``--prompt_tokens`` random tokens, then ``--steps``
greedy decoding steps through transformers' ``StaticCache`` (fixed shapes: what ``torch.compile`` needs to compile a
step once). Each configuration runs in its own process (inductor's settings are global):

    eager            F.linear (``--linear_kernels torch``)
    eager_packed     the default oneDNN-packed linear layers with fused projections (:mod:`utils.linear_kernels`)
    compiled         F.linear, the step compiled by inductor with ``freezing`` (constant weights folded and packed
                     by inductor itself), ``dynamic=False``
    compiled_dynamic the same with ``dynamic=True`` (one graph for any batch and position, as a server would need)
    ours             the project's own step (:class:`utils.decoding.BatchDecoder`, every entry's), packed and fused
                     linear layers, its own in-place KV cache, base rows

"first step" is the first decoding step's time (the compilation, for ``compiled``); "step" the median of the last
half of the steps, the fastest of ``--repeats`` interleaved runs; "same tokens" compares every row's greedy tokens with ``eager``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_helpers import cpu_name, write_result  # noqa: E402

logger = logging.getLogger("bench")
MODES = ("eager", "eager_packed", "compiled", "compiled_dynamic", "ours")


def measure(mode: str, batch: int, prompt_tokens: int, steps: int, work: str) -> dict:
    """One configuration in this process: its first step, median step and greedy tokens."""
    from transformers import StaticCache

    from utils.model_loading import load_base_model

    ids = torch.randint(100, 40000, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    if mode == "ours":
        from bench.bench_helpers import embedded_random_pool, step_times
        from utils.composition import LiveComposition

        tok, pool, _ = embedded_random_pool(Path(work))
        half = steps // 2
        ms, generated = step_times(pool.model, tok, LiveComposition(pool, grouped=True), [(row, []) for row in ids.tolist()],
                                   steps - half, warmup=half)
        return {"mode": mode, "first_step_ms": None, "step_ms": round(ms, 2), "tokens": [g[:steps + 1] for g in generated]}

    model = load_base_model("embedded:smollm2-135m-instruct", dtype="float32", device="cpu",
                            linear_kernels="onednn" if mode == "eager_packed" else "torch")
    cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=prompt_tokens + steps + 8)

    def step(tok: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tok, past_key_values=cache, cache_position=position, use_cache=True).logits

    if mode.startswith("compiled"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        step = torch.compile(step, dynamic=mode == "compiled_dynamic")
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt_tokens), use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        tokens, times = [tok], []
        for i in range(steps):
            t0 = time.perf_counter()
            tok = step(tok, torch.tensor([prompt_tokens + i]))[:, -1:].argmax(-1)
            times.append(1000 * (time.perf_counter() - t0))
            tokens.append(tok)
    return {"mode": mode, "first_step_ms": round(times[0], 1), "step_ms": round(statistics.median(times[steps // 2:]), 2),
            "tokens": torch.cat(tokens, 1).tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lora_retriever_bench_pool", help="the random pool ``ours`` decodes with (built when missing)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_tokens", type=int, default=60)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="runs of every configuration, interleaved; the fastest is kept")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # run one configuration, print its JSON
    p.add_argument("--out", default="docs/bench_compile_step", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.one:
        sys.stdout.write(json.dumps(measure(args.one, args.batch, args.prompt_tokens, args.steps, args.work)) + "\n")
        return 0
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--batch", str(args.batch), "--prompt_tokens",
                                  str(args.prompt_tokens), "--steps", str(args.steps), "--work", args.work], check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            logger.info("%s: first step %s ms, step %s ms", mode, row["first_step_ms"], row["step_ms"])
            if mode not in best or row["step_ms"] < best[mode]["step_ms"]:
                best[mode] = row
    rows = [best[mode] for mode in MODES]
    reference = rows[0]["tokens"]
    for row in rows:
        row["same_tokens"] = row.pop("tokens") == reference
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": "embedded:smollm2-135m-instruct",
              "dtype": "float32", "batch": args.batch, "prompt_tokens": args.prompt_tokens, "steps": args.steps, "rows": rows}
    lines = ["| step | first step | step (median) | same tokens as eager |", "|---|---:|---:|---|"]
    lines += [f"| {r['mode']} | {'' if r['first_step_ms'] is None else str(r['first_step_ms']) + ' ms'} | {r['step_ms']} ms | {'yes' if r['same_tokens'] else 'no'} |" for r in rows]
    lines += ["", f"{result['cpu']}, {result['threads']} threads; SmolLM2-135M in float32, {args.batch} rows, StaticCache."]
    write_result(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
