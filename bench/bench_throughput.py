"""Throughput of the pipeline against the original code's approach, on the embedded default.

    python bench/bench_throughput.py --rows 32 --batch_sizes 1 8 16 --max_new_tokens 16 --out docs/bench_throughput.json

Configurations, all on the same rows with exactly ``max_new_tokens`` generated per row (min = max, so every
configuration does the same work):
  (a) base        the base model, no adapter
  (b) mixture / fusion at k=3 and selection (k=1) with this project's composition (stacked weights, factors
      built once per batch, batched retrieval)
  (c) original    a re-creation of the original code's loop: for each batch the retrieved adapters are loaded
      with ``load_adapter`` and deleted after; the composition (einsums over the per-sample adapters'
      A and B) is recomputed at every forward; queries are embedded one at a time
  (d) peft        peft's own mixed-batch inference (``adapter_names``) for selection
Retrieval time is included in (b), (c) and (d) (embedding the batch's queries and searching).
Batches: (a), (b) and (d) take rows grouped by prompt length, as ``main.py`` does; (c) takes them in file order,
as the original code does. ``base_file_order`` (the base model on file-order batches) separates what batching by
length gains from what the composition gains.

``--synthetic llama2-7b`` replaces SmolLM2 and the trained pool by a model of Llama-2-7B's shape with random
weights and ``--num_adapters`` random r=8 q_proj/v_proj LoRAs written to disk (so that (c) loads them from
disk as the original does); queries, prompts and retrieval stay real. It is meant for a GPU:

    python bench/bench_throughput.py --synthetic llama2-7b --device cuda --dtype bfloat16 --num_adapters 48 \\
        --rows 64 --batch_sizes 32 --max_new_tokens 32 --out docs/bench_throughput_7b.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.adapter_pool import AdapterPool  # noqa: E402
from utils.composition import compose  # noqa: E402
from utils.data import PoolEntry, load_pool_config, load_rows  # noqa: E402
from utils.generation import length_sorted_batches  # noqa: E402
from utils.model_loading import load_base_model, load_tokenizer, resolve_dtype  # noqa: E402
from utils.prompter import Prompter  # noqa: E402
from utils.retrieval import Embedder, LoraRetriever, composition_weights  # noqa: E402

logger = logging.getLogger("bench")


# Shapes of the synthetic base models: Llama-2-7B's (its vocabulary replaced by the SmolLM2 tokenizer's, the one
# tokenizer available offline) and a tiny one that exercises the same code on a CPU in seconds.
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=4096),
}


def generate(model, tok, prompts, n_new, **kw):
    device = next(model.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=tok.pad_token_id, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.shape[1] - enc["input_ids"].shape[1]


def synthetic_setup(shape: str, vocab_size: int, num_adapters: int, rank: int, rows: list[dict], folder: Path,
                    device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight Llama of ``shape`` and ``num_adapters`` random LoRAs saved as peft adapters under ``folder``.

    Adapter j is retrieved by the inputs of suite task j mod (number of tasks): its pool samples are those rows.
    Returns (model, pool entries).
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, **SHAPES[shape])
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    tasks = sorted({r["task"] for r in rows})
    by_task = {t: [r["inputs"] for r in rows if r["task"] == t] for t in tasks}
    h, n_layers = config.hidden_size, config.num_hidden_layers
    entries = []
    gen = torch.Generator().manual_seed(seed)
    for j in range(num_adapters):
        name, path = f"syn{j:03d}", folder / f"syn{j:03d}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(n_layers):
            for proj in ("q_proj", "v_proj"):
                key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, h, generator=gen) / h ** 0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(h, rank, generator=gen) * 0.01).to(dtype)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"], "bias": "none", "base_model_name_or_path": f"synthetic-{shape}"}))
        task = tasks[j % len(tasks)]
        entries.append(PoolEntry(name=name, domain=task, samples=by_task[task][:20], path=str(path)))
    return model, entries


def batches(items, bs):
    return [items[i:i + bs] for i in range(0, len(items), bs)]


class OriginalLoop:
    """Per batch: load the retrieved adapters, compose by einsum at every forward, delete them afterwards."""

    def __init__(self, peft_model, paths: dict[str, str], mode: str):
        self.model, self.paths, self.mode = peft_model, paths, mode

    def run(self, tok, prompts, chosen, n_new):
        from peft.tuners.lora import LoraLayer

        needed = sorted({n for row in chosen for n in row})
        for n in needed:
            self.model.load_adapter(self.paths[n], adapter_name=f"tmp_{n}")
        k = len(chosen[0])
        handles = []

        def hook(module, args, output):
            # recomputed at every forward: gather each sample's adapters and compose them
            A = torch.stack([torch.stack([module.lora_A[f"tmp_{n}"].weight for n in row]) for row in chosen])  # [b,k,r,in]
            B = torch.stack([torch.stack([module.lora_B[f"tmp_{n}"].weight * module.scaling[f"tmp_{n}"] for n in row]) for row in chosen])
            x = args[0].to(A.dtype)  # as peft does: the input cast to the adapter weights' dtype
            w = torch.full((len(chosen), k), 1.0 / k, device=x.device, dtype=x.dtype)
            if self.mode == "fusion":
                A_f, B_f = torch.einsum("bk,bkri->bri", w, A), torch.einsum("bk,bkor->bor", w, B)
                delta = torch.einsum("bor,btr->bto", B_f, torch.einsum("bri,bti->btr", A_f, x))
            else:
                delta = torch.einsum("bk,bkor,bktr->bto", w, B, torch.einsum("bkri,bti->bktr", A, x))
            return output + delta.to(output.dtype)

        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and any(f"tmp_{n}" in module.lora_A for n in needed):
                handles.append(module.register_forward_hook(hook))
        try:
            with self.model.disable_adapter():
                return generate(self.model, tok, prompts, n_new)
        finally:
            for h in handles:
                h.remove()
            for n in needed:
                self.model.delete_adapter(f"tmp_{n}")


def markdown_report(results: list[dict]) -> str:
    """Throughput table and the ratios (b)/(a), (b)/(c) and selection/(d) per batch size."""
    lines = ["| batch | config | rows/s | tokens/s (end to end) | tokens/s (generation only) | retrieval s | seconds |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['batch_size']} | {r['config']} | {r['rows_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['generation_tokens_per_s']:.1f} | {r['retrieval_s']:.2f} | {r['seconds']:.1f} |")
    lines += ["", "Ratios of tokens/s: composition against the base model on generation alone (composition overhead), "
              "against the original loop and peft end to end (retrieval included), and the base model on batches "
              "grouped by length against file-order batches (what batching by length alone gains).", "",
              "| batch | mixture/base | fusion/base | selection/base | mixture/original | fusion/original | selection/peft | base: by length/file order |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bs in sorted({r["batch_size"] for r in results}):
        rs = {r["config"]: r for r in results if r["batch_size"] == bs}

        def ratio(a, b, key):
            return f"{rs[a][key] / rs[b][key]:.2f}" if a in rs and b in rs else "–"

        g, e = "generation_tokens_per_s", "tokens_per_s"
        lines.append(f"| {bs} | {ratio('mixture', 'base', g)} | {ratio('fusion', 'base', g)} | {ratio('selection', 'base', g)} | "
                     f"{ratio('mixture', 'original_mixture', e)} | {ratio('fusion', 'original_fusion', e)} | "
                     f"{ratio('selection', 'peft_selection', e)} | {ratio('base', 'base_file_order', e)} |")
    return "\n".join(lines) + "\n"


FILE_ORDER = ("original_mixture", "original_fusion", "base_file_order")  # batches in file order, as the original code


def run_config(config, bs, pool, peft_model, paths, retriever, tok, prompts, texts, n_new, lengths):
    """(generation seconds, retrieval seconds, generated tokens) of one configuration over all rows."""
    rows = list(range(len(prompts)))
    k = 1 if config in ("selection", "peft_selection") else 3
    chosen, weights, ret_s = None, None, 0.0
    if config in ("mixture", "fusion", "selection", "peft_selection"):  # as main.py: all queries in one batched call
        t0 = time.perf_counter()
        chosen, scores = retriever.search(texts, k)
        weights = torch.as_tensor(composition_weights(scores))
        ret_s = time.perf_counter() - t0
    gen_s, n_tok = 0.0, 0
    for idx in (batches(rows, bs) if config in FILE_ORDER else length_sorted_batches(lengths, bs)):
        bp = [prompts[i] for i in idx]
        t0 = time.perf_counter()
        if config in ("base", "base_file_order"):
            n = generate(pool.model, tok, bp, n_new)
        elif config.startswith("original"):
            t1 = time.perf_counter()
            picked = [retriever.search([texts[i]], k)[0][0] for i in idx]  # one query at a time, as the original
            ret_s += time.perf_counter() - t1
            t0 += time.perf_counter() - t1
            n = OriginalLoop(peft_model, paths, config.split("_")[1]).run(tok, bp, picked, n_new)
        elif config == "peft_selection":
            n = generate(peft_model, tok, bp, n_new, adapter_names=[chosen[i][0] for i in idx])
        else:
            mode = "fusion" if config == "fusion" else "mixture"
            with compose(pool, pool.indices([chosen[i] for i in idx]), weights[idx], mode) as m:
                n = generate(m, tok, bp, n_new)
        gen_s += time.perf_counter() - t0
        n_tok += n * len(idx)
    return gen_s, ret_s, n_tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--data_path", default="data/bigbench/combined_test.json")
    p.add_argument("--config_path", default="config/bigbench_pool.json")
    p.add_argument("--configs", nargs="+", default=["base", "mixture", "fusion", "selection", "original_mixture", "original_fusion",
                                                   "peft_selection", "base_file_order"])
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration (interleaved); the fastest is kept")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--synthetic", default=None, choices=sorted(SHAPES),
                   help="random-weight base model of this shape and --num_adapters random LoRAs instead of the embedded default")
    p.add_argument("--num_adapters", type=int, default=48, help="with --synthetic: pool size")
    p.add_argument("--rank", type=int, default=8, help="with --synthetic: LoRA rank")
    p.add_argument("--out", default="docs/bench_throughput.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = load_rows(args.data_path)
    all_rows = rows
    rows = [rows[i * len(rows) // args.rows] for i in range(args.rows)]  # spread over the tasks
    prompter = Prompter("alpaca")
    prompts = [prompter.generate_prompt(r["inputs"]) for r in rows]
    texts = [r["inputs"] for r in rows]
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    lengths = [len(ids) for ids in tok(prompts).input_ids]
    dtype = resolve_dtype(args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        if args.synthetic:
            t0 = time.perf_counter()
            base, pool_entries = synthetic_setup(args.synthetic, len(tok), args.num_adapters, args.rank, all_rows, Path(tmp),
                                                 args.device, dtype)
            logger.info("Synthetic %s model and %d adapters built in %.1f s", args.synthetic, len(pool_entries), time.perf_counter() - t0)
        else:
            pool_entries = load_pool_config(args.config_path)
            base = load_base_model("embedded:smollm2-135m-instruct", dtype=args.dtype, device=args.device)
        embedder = Embedder("embedded:all-minilm-l6-v2", device=args.device)
        retriever = LoraRetriever(embedder, [e.name for e in pool_entries], [e.samples for e in pool_entries])
        pool = AdapterPool(base, pool_entries, show_progress=False)
        paths = {e.name: e.path for e in pool_entries}
        results = []
        peft_model = None
        if any(c.startswith("original") or c == "peft_selection" for c in args.configs):
            # stock peft's own multi-adapter model (the adapters injected), on its own copy of the base weights
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), pool_entries[0].path, adapter_name=pool_entries[0].name)
            for e in pool_entries[1:]:
                peft_model.load_adapter(e.path, adapter_name=e.name)
            peft_model.eval()
        generate(pool.model, tok, prompts[:2], 2)  # warm-up
        for bs in args.batch_sizes:
            timings: dict[str, list] = {c: [] for c in args.configs}
            for rep in range(args.repeats):  # configurations interleaved, best of the repeats kept
                for config in args.configs:
                    timings[config].append(run_config(config, bs, pool, peft_model, paths, retriever, tok, prompts, texts, args.max_new_tokens, lengths))
            for config in args.configs:
                gen_s, ret_s, n_tok = min(timings[config], key=lambda t: t[0] + t[1])
                dt = gen_s + ret_s
                results.append({"batch_size": bs, "config": config, "rows": len(rows), "generated_tokens": n_tok, "seconds": round(dt, 3),
                                "retrieval_s": round(ret_s, 3), "rows_per_s": round(len(rows) / dt, 3),
                                "tokens_per_s": round(n_tok / dt, 2), "generation_tokens_per_s": round(n_tok / gen_s, 2)})
                logger.info("bs %2d %-17s %6.2f rows/s %7.1f tok/s end to end, %7.1f tok/s generation (retrieval %.2f s)",
                            bs, config, len(rows) / dt, n_tok / dt, n_tok / gen_s, ret_s)
    md = markdown_report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".md").write_text(md)
    sys.stdout.write(md)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"device": device_name, "threads": torch.get_num_threads(), "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
           "model": f"synthetic {args.synthetic}" if args.synthetic else "embedded:smollm2-135m-instruct",
           "adapters": len(pool_entries), "torch": torch.__version__, "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
