"""What a request joining a running batch costs the batch: its prefill in a forward of its own between two decoding
steps (``serve.py --prefill separate``), against the same prefill inside the next step's forward (a mixed step,
:class:`utils.decoding.RaggedStep`, the default).

    python bench/bench_mixed_step.py --out docs/bench_mixed_step        # about 2 minutes on 2 CPU cores

The embedded SmolLM2 in float32, ``--rows`` running rows (prompts of 60 tokens, two steps decoded first), then one
step during which ``--joining`` rows of ``--prompt_tokens`` tokens join; the figure is the median over ``--reps``
rounds (after one warm-up round of each) of the time from the step's start until every row, running and joining, has
its next token:

    separate    decoder.step(), then decoder.add(joining): two forwards
    mixed       decoder.step(joining): one forward

Rows are base rows (``base``) or each a top-3 mixture of 13 random LoRAs of the embedded pool's shape (``mixture``,
joining rows included). ``same tokens`` counts the rounds where both ways gave every row the same token.

Then a prompt of ``--long_prompt`` tokens joins the running base rows with each of ``--caps`` as the decoder's
``max_prefill_tokens`` (serve.py's ``--max_prefill_tokens``; 0: the whole prompt in one step): the running rows'
longest wait for a token while it is prefilled, and the time until it has its first token (medians).
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
from utils.decoding import BatchDecoder, Sequence  # noqa: E402

logger = logging.getLogger("bench")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lora_retriever_bench_pool")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--cases", nargs="+", default=["1x16", "1x48", "1x100", "4x48", "16x48"], help="JOININGxPROMPT_TOKENS")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--long_prompt", type=int, default=1000, help="tokens of the prompt that joins in the chunked part")
    p.add_argument("--caps", type=int, nargs="+", default=[0, 512, 256], help="max_prefill_tokens values (0: no cap)")
    p.add_argument("--out", default="docs/bench_mixed_step", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = "embedded:smollm2-135m-instruct"
    tok, pool, names = embedded_random_pool(Path(args.work))
    model = pool.model
    live = LiveComposition(pool)
    decoder = BatchDecoder(model, tok, live, context_length=4096, live_text=False)
    gen = torch.Generator().manual_seed(0)

    def seq(n_tokens: int, i: int, composed: bool) -> Sequence:
        adapters = [names[(i + j) % len(names)] for j in range(3)] if composed else []
        return Sequence(prompt_ids=torch.randint(100, 40000, (n_tokens,), generator=gen).tolist(), max_new_tokens=64,
                        ignore_eos=True, adapters=adapters, adapter_w=[1 / 3] * len(adapters))

    def clone(s: Sequence) -> Sequence:
        return Sequence(prompt_ids=s.prompt_ids, max_new_tokens=s.max_new_tokens, ignore_eos=True, adapters=s.adapters,
                        adapter_w=s.adapter_w)

    def round_(running, joining, mixed: bool):
        decoder.reset()
        decoder.add(running)
        decoder.step()
        decoder.step()
        t0 = time.perf_counter()
        if mixed:
            decoder.step(joining)
        else:
            decoder.step()
            decoder.add(joining)
        ms = 1000 * (time.perf_counter() - t0)
        return ms, [s.generated[-1] for s in running + joining]

    rows = []
    with live.active():
        decoder.check_model()
        for mixed in (False, True):  # warm-up: the first forwards of each shape pay oneDNN's set-up
            round_([seq(60, i, True) for i in range(args.rows)], [seq(16, 0, True)], mixed)
        for kind in ("base", "mixture"):
            for case in args.cases:
                n_join, length = (int(x) for x in case.split("x"))
                sep, mix, same = [], [], 0
                for r in range(args.reps):
                    running = [seq(60, i, kind == "mixture") for i in range(args.rows)]
                    joining = [seq(length, args.rows + i + r, kind == "mixture") for i in range(n_join)]
                    ms_s, tokens_s = round_([clone(s) for s in running], [clone(s) for s in joining], mixed=False)
                    ms_m, tokens_m = round_([clone(s) for s in running], [clone(s) for s in joining], mixed=True)
                    sep.append(ms_s)
                    mix.append(ms_m)
                    same += tokens_s == tokens_m
                row = {"rows": kind, "running": args.rows, "joining": n_join, "prompt_tokens": length,
                       "separate_ms": round(statistics.median(sep), 1), "mixed_ms": round(statistics.median(mix), 1),
                       "same_tokens": f"{same}/{args.reps}"}
                logger.info("%s", row)
                rows.append(row)
        # A long prompt joins 15 running base rows, whole or in chunks of at most ``cap`` tokens per step: the
        # running rows' longest wait for a token, and the time until the joining row has its first token.
        chunked = []
        for cap in args.caps:
            decoder.max_prefill_tokens = cap or None
            gaps, firsts = [], []
            for _ in range(max(2, args.reps // 2)):
                decoder.reset()
                running = [seq(60, i, False) for i in range(args.rows)]
                decoder.add(running)
                decoder.step()
                joining = seq(args.long_prompt, 0, False)
                t0 = last = time.perf_counter()
                longest = 0.0
                decoder.step([joining])
                while not joining.generated:
                    now = time.perf_counter()
                    longest, last = max(longest, now - last), now
                    decoder.step()
                now = time.perf_counter()
                gaps.append(1000 * max(longest, now - last))
                firsts.append(1000 * (now - t0))
            row = {"cap": cap, "running": args.rows, "prompt_tokens": args.long_prompt,
                   "longest_gap_ms": round(statistics.median(gaps), 1), "first_token_ms": round(statistics.median(firsts), 1)}
            logger.info("%s", row)
            chunked.append(row)
        decoder.max_prefill_tokens = None
        decoder.reset()
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": base, "dtype": "float32", "rows": rows,
              "chunked": chunked}
    lines = ["| rows | running | joining x prompt tokens | separate prefill (ms) | mixed step (ms) | mixed / separate | same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['rows']} | {r['running']} | {r['joining']} x {r['prompt_tokens']} | {r['separate_ms']} | {r['mixed_ms']} | "
              f"{r['mixed_ms'] / r['separate_ms']:.2f} | {r['same_tokens']} |" for r in rows]
    lines += ["", f"Medians over {args.reps} rounds; {result['cpu']}, {result['threads']} threads.", "",
              f"| max_prefill_tokens | running rows | joining prompt | running rows' longest wait for a token (ms) | "
              "joining row's first token (ms) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['cap'] or 'no cap'} | {r['running']} | {r['prompt_tokens']} tokens | {r['longest_gap_ms']} | "
              f"{r['first_token_ms']} |" for r in chunked]
    write_result(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
