"""lm-evaluation-harness, unchanged, scoring a retrieved LoRA pool through serve.py (a real process on a local port).

lm-eval's ``local-completions`` model sends loglikelihood requests as batches of token-id lists with ``echo``,
``logprobs: 1`` and ``max_tokens: 1``, reads the prompt tokens' logprobs, and finds the tokenizer through the server's
``/tokenizer_info``, ``/tokenize`` and ``/detokenize`` (``tokenizer_backend=remote``). The accuracy it reports must equal
the accuracy computed here, in-process, from the log-likelihoods of the same token lists under the same retrieved
compositions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_serve_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("snarks", "winowhy", "sports_understanding", "entailed_polarity")


def mc_rows(per_task: int = 5) -> list[dict]:
    """Multiple-choice rows from the embedded suite's test rows: tasks whose targets come from a small label set."""
    rows = json.loads((ROOT / "data/bigbench/combined_test.json").read_text())
    out = []
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        labels = sorted({r["targets"] for r in mine})
        assert 2 <= len(labels) <= 4, (task, labels)
        out += [{"query": r["inputs"], "choices": labels, "gold": labels.index(r["targets"]), "task": task} for r in mine[:per_task]]
    return out


def write_task(d: Path, rows: list[dict]) -> Path:
    data = d / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "lora_mc.yaml").write_text(
        "task: lora_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{query}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{gold}}\"\n"
        "metric_list:\n  - metric: acc\n")
    return d


def run_lm_eval(url: str, model: str, tasks_dir: Path, out: Path, extra: str = "") -> tuple[float, list[dict]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args = (f"base_url={url}/v1/completions,model={model},tokenized_requests=True,tokenizer_backend=remote,"
            f"num_concurrent=1,max_retries=1,timeout=600{extra}")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args, "--tasks", "lora_mc",
           "--include_path", str(tasks_dir), "--batch_size", "8", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = next(out.rglob("results_*.json"))
    acc = json.loads(results.read_text())["results"]["lora_mc"]["acc,none"]
    samples = [json.loads(line) for line in next(out.rglob("samples_lora_mc_*.jsonl")).read_text().splitlines()]
    return acc, samples


def in_process_accuracy(samples: list[dict], model: str, pool_config: Path) -> tuple[float, list[list[float]]]:
    """Each sample's choices scored here: lm-eval's token lists (context and continuation encoded as it does), the
    retrieval query their text, the same router and composition as the server, the sum of the continuation's logprobs."""
    from utils.adapter_pool import AdapterPool
    from utils.composition import compose
    from utils.data import load_pool_config
    from utils.flags import DEFAULT_RETRIEVER, PAPER_INSTRUCTION
    from utils.model_loading import load_base_model, load_tokenizer
    from utils.retrieval import Embedder, LoraRetriever
    from utils.routing import Route, Router

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    entries = load_pool_config(pool_config)
    pool = AdapterPool(load_base_model("embedded:smollm2-135m-instruct"), entries, show_progress=False)
    retriever = LoraRetriever(Embedder(DEFAULT_RETRIEVER, PAPER_INSTRUCTION), [e.name for e in entries], [e.samples for e in entries])
    router = Router([e.name for e in entries], [e.domain for e in entries], retriever)
    correct, all_ll = 0, []
    for sample in samples:
        lls = []
        args = sample["arguments"]
        for arg in (args.values() if isinstance(args, dict) else args):
            context, continuation = (arg["arg_0"], arg["arg_1"]) if isinstance(arg, dict) else (arg[0], arg[1])
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tok(context + continuation, add_special_tokens=False).input_ids
            ctx = tok(context, add_special_tokens=False).input_ids
            ids = whole
            route = Route("auto", k=3) if model == "auto" else Route("base")
            routing = router.route([tok.decode(ids)], [route])
            with torch.no_grad():
                x = torch.tensor([ids])
                if routing.adapters[0]:
                    with compose(pool, pool.indices([routing.adapters[0]]), torch.tensor([routing.weights[0]]), routing.modes[0]) as m:
                        logits = m(input_ids=x).logits[0]
                else:
                    logits = pool.model(input_ids=x).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            lls.append(sum(float(lp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
        all_ll.append(lls)
        correct += int(max(range(len(lls)), key=lambda i: lls[i]) == int(sample["target"]))
    return correct / len(samples), all_ll


@pytest.mark.slow
def test_lm_eval_scores_retrieved_mixtures_and_the_base_model(tmp_path):
    from tests.helpers import make_smollm_pool

    pool_config = make_smollm_pool(tmp_path / "pool", names=TASKS)
    tasks_dir = write_task(tmp_path, mc_rows())
    server = ServerProcess(["--config_path", str(pool_config), "--max_tokens_cap", "64"], tmp_path / "server.log")
    try:
        server.wait_ready()
        results = {m: run_lm_eval(server.url, m, tasks_dir, tmp_path / f"out_{m}") for m in ("auto", "base")}
    finally:
        assert server.stop() == 0
    for model, (acc, samples) in results.items():
        assert len(samples) == len(mc_rows())
        mine, lls = in_process_accuracy(samples, model, pool_config)
        assert acc == pytest.approx(mine, abs=1e-4), model
        theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]  # each choice's (loglikelihood, is_greedy)
        assert max(abs(a - b) for ra, rb in zip(theirs, lls) for a, b in zip(ra, rb)) < 2e-3, model
    assert results["auto"][1][0]["resps"] != results["base"][1][0]["resps"], "the retrieved mixture changes the scores"
