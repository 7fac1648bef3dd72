"""Which prompt should the server give chat requests: the pool's prompt template or the tokenizer's chat template?

    python bench/bench_chat_format.py          # embedded default; writes docs/bench_chat_format.{json,md}

Starts ``serve.py`` (``--settings config/embedded.json`` by default), sends test rows of ``--data_path`` as
one-message chats (``model: auto``, greedy) once with ``chat_format: template`` and once with
``chat_format: chat_template``, and scores the answers with the paper's metrics (EM, BLEU, ROUGE), task by task.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MAIN_SCORE = {"em": "em", "bleu": "bleu", "rouge": "rougeL"}


async def answer_all(url: str, rows: list[dict], chat_format: str, max_tokens: int, concurrency: int) -> list[str]:
    out = [None] * len(rows)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i, row):
            async with sem:
                r = await client.post(url + "/v1/chat/completions", json={
                    "model": "auto", "messages": [{"role": "user", "content": row["inputs"]}], "max_tokens": max_tokens,
                    "chat_format": chat_format})
                r.raise_for_status()
                out[i] = r.json()["choices"][0]["message"]["content"].strip()
        await asyncio.gather(*(one(i, row) for i, row in enumerate(rows)))
    return out


def main(argv=None) -> int:
    from bench_serve import start_server

    from utils.tables import task_scores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="data/bigbench/combined_test.json")
    p.add_argument("--rows_per_task", type=int, default=5, help="first N test rows of every task")
    p.add_argument("--max_tokens", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--server_args", default="--settings config/embedded.json")
    p.add_argument("--out", default="docs/bench_chat_format")
    args = p.parse_args(argv)

    rows, seen = [], defaultdict(int)
    for row in json.loads((ROOT / args.data_path).read_text()):
        if seen[row["task"]] < args.rows_per_task:
            seen[row["task"]] += 1
            rows.append(row)
    proc, url = start_server(args.server_args.split() + ["--max_batch_size", str(args.concurrency)], ROOT / ".bench_chat_format.log")
    report = {"command": "python bench/bench_chat_format.py " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": len(rows),
              "formats": {}}
    try:
        for fmt in ("template", "chat_template"):
            preds = asyncio.run(answer_all(url, rows, fmt, args.max_tokens, args.concurrency))
            scored = task_scores([dict(r, predicted_answer=p) for r, p in zip(rows, preds)], fmt)
            per_task = {t: round(s["scores"][MAIN_SCORE[s["metric"]]], 2) for t, s in scored.items()}
            report["formats"][fmt] = {"per_task": per_task, "mean": round(sum(per_task.values()) / len(per_task), 2),
                                      "examples": preds[:3]}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    (ROOT / f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    tasks = list(report["formats"]["template"]["per_task"])
    lines = ["| task (score) | template | chat_template |", "|---|---:|---:|"]
    for t in tasks:
        lines.append(f"| {t} | {report['formats']['template']['per_task'][t]:.2f} | {report['formats']['chat_template']['per_task'][t]:.2f} |")
    lines.append(f"| mean over tasks | {report['formats']['template']['mean']:.2f} | {report['formats']['chat_template']['mean']:.2f} |")
    (ROOT / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
