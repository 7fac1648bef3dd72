"""Serving benchmark against vLLM, in one run, on one machine, with one client: vLLM's own benchmark client.

    python bench/bench_vs_vllm.py --random_pool            # embedded SmolLM2 on CPU; writes docs/bench_vs_vllm.{json,md}
    python bench/bench_vs_vllm.py                          # the trained embedded pool (`make pool` first)
    python bench/bench_vs_vllm.py --settings config/paper_llama2_7b.json --device cuda --dtype bfloat16 \\
        --vllm_python /path/to/cuda-vllm/bin/python      # the paper's 7B profile on a GPU

Five servers, each measured at every ``--clients`` level (``vllm.benchmarks.serve``: completions, streamed,
``ignore_eos``, exactly ``--max_tokens`` tokens per request, greedy, the suite's mixed-task inputs shuffled, raw prompts):

- (a) ``serve.py``, ``model: auto``: retrieval of the top-k adapters and their mixture per request, generated here;
- (b) ``serve.py --engine vllm``, ``model: auto``: the same retrieval and mixture, each composition registered with
  vLLM as one LoRA and generated there;
- (c) vLLM alone, one adapter per request picked at random by the client (``--lora-modules``: what vLLM users do);
- (d) vLLM's base model;
- (e) ``serve.py --no_adapters``: our base model, the same decoding step as (a) without composition.

(a) and (e) run alone first; then one vLLM server (LoRA on, ``--max-lora-rank`` for a mixture of ``--lora_num`` adapters)
serves (b), (c) and (d) in turn. vLLM's benchmark client runs from vLLM's virtualenv (``make vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_helpers import cpu_name, free_port, random_pool, stop, wait_for  # noqa: E402

CLIENT = r"""
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.loads(sys.argv[1]):
    p = FlexibleArgumentParser()
    add_cli_args(p)
    result = main(p.parse_args(argv))
    out.append({k: result.get(k) for k in ("completed", "failed", "output_throughput", "median_ttft_ms", "mean_ttft_ms",
                                           "median_tpot_ms", "mean_tpot_ms", "duration", "total_output_tokens")})
open(sys.argv[2], "w").write(json.dumps(out))
"""


def client_runs(base_url: str, model: str, tokenizer: str, dataset: Path, args, out_dir: Path, tag: str,
                lora_modules: list[str] | None = None) -> list[list[str]]:
    runs = []
    for c in args.clients:
        n = max(args.min_prompts, args.prompts_per_client * c)
        argv = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", tokenizer,
                "--served-model-name", model, "--tokenizer", tokenizer, "--dataset-name", "custom", "--dataset-path", str(dataset),
                "--skip-chat-template", "--custom-output-len", str(args.max_tokens), "--num-prompts", str(n), "--max-concurrency", str(c),
                "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(args.seed), "--disable-tqdm",
                "--percentile-metrics", "ttft,tpot,itl", "--save-result", "--result-dir", str(out_dir),
                "--result-filename", f"{tag}_{c}.json"]
        if lora_modules:
            argv += ["--lora-modules", *lora_modules]
        runs.append(argv)
    return runs


def run_client(runs: list[list[str]], args, work: Path, tag: str) -> list[dict]:
    out = work / f"{tag}.client.json"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu" if args.device == "cpu" else os.environ.get("VLLM_TARGET_DEVICE", ""))
    if Path(runs[0][runs[0].index("--tokenizer") + 1]).is_dir():
        env["HF_HUB_OFFLINE"] = "1"
    if not env["VLLM_TARGET_DEVICE"]:
        env.pop("VLLM_TARGET_DEVICE")
    log = work / f"{tag}.client.log"
    with open(log, "w") as f:
        done = subprocess.run([args.vllm_python, "-c", CLIENT, json.dumps(runs), str(out)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0:
        raise SystemExit(f"vLLM's benchmark client failed for {tag}; see {log}:\n{log.read_text()[-2000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=None, help="a profile (e.g. config/paper_llama2_7b.json): its base_model and config_path")
    p.add_argument("--base_model", default=None, help="default: the profile's, else the embedded SmolLM2")
    p.add_argument("--config_path", default=None, help="pool config (default: the profile's, else config/bigbench_pool.json)")
    p.add_argument("--random_pool", action="store_true", help="build 13 random LoRAs of the embedded pool's shape instead (no training)")
    p.add_argument("--data_path", default="data/bigbench/combined_test.json", help="rows whose inputs are the prompts")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompts_per_client", type=int, default=3)
    p.add_argument("--min_prompts", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--lora_num", type=int, default=3)
    p.add_argument("--max_loras", type=int, default=16, help="vLLM's --max-loras (and --max-cpu-loras at least the pool)")
    p.add_argument("--max_num_seqs", type=int, default=32, help="vLLM's --max-num-seqs and serve.py's --max_batch_size")
    p.add_argument("--configs", nargs="+", default=["a", "e", "b", "c", "d"], choices=["a", "b", "c", "d", "e"])
    p.add_argument("--vllm_python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--serve_args", nargs="+", default=[], help="more flags for serve.py in (a) and (e), e.g. --serve_args=--embed_ahead=on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench_vs_vllm", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)

    from utils.adapter_files import read_adapter_config_rank
    from utils.data import load_pool_config
    from utils.model_loading import resolve_model_path
    from utils.vllm_compositions import vllm_rank
    from utils.vllm_launch import vllm_command

    profile = json.loads(Path(args.settings).read_text()) if args.settings else {}
    base_model = args.base_model or profile.get("base_model") or "embedded:smollm2-135m-instruct"
    work = Path(tempfile.mkdtemp(prefix="bench_vs_vllm_"))
    config = (random_pool(work / "pool", base_model) if args.random_pool
              else Path(args.config_path or profile.get("config_path") or "config/bigbench_pool.json"))
    entries = load_pool_config(str(config), profile.get("adapter_pattern"))
    from utils.data import looks_like_hub_id

    missing = [e.name for e in entries if not looks_like_hub_id(e.path) and not Path(e.path).exists()]
    if missing:
        raise SystemExit(f"The pool's adapters {missing[:3]} are not on disk: run `make pool` (trains them), or pass --random_pool.")
    rank = vllm_rank(args.lora_num * max(read_adapter_config_rank(e.path) for e in entries))
    model_dir = resolve_model_path(base_model)
    rows = json.loads(Path(args.data_path).read_text())
    random.Random(args.seed).shuffle(rows)
    dataset = work / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": r["inputs"]}) + "\n" for r in rows))
    serve_common = ["--config_path", str(config), "--base_model", base_model, "--device", args.device, "--dtype", args.dtype,
                    "--prompt_format", "raw", "--max_batch_size", str(args.max_num_seqs), "--lora_num", str(args.lora_num),
                    "--max_tokens_cap", str(max(args.max_tokens, 64))]
    if args.settings:
        serve_common = ["--settings", args.settings] + serve_common
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if Path(model_dir).is_dir():  # local models: nobody asks the Hub (hub ids on a GPU machine keep their download)
        env["HF_HUB_OFFLINE"] = "1"
    results: dict[str, list[dict]] = {}
    t_start = time.time()

    for tag, extra, model in (("a", [], "auto"), ("e", ["--no_adapters"], "base")):
        if tag not in args.configs:
            continue
        port = free_port()
        log = work / f"serve_local_{tag}.log"
        proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), *serve_common, *extra, *args.serve_args], cwd=ROOT, env=env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        try:
            wait_for(f"http://127.0.0.1:{port}/health", proc, log)
            results[tag] = run_client(client_runs(f"http://127.0.0.1:{port}", model, model_dir, dataset, args, work, tag), args, work, tag)
        finally:
            stop(proc)
    if {"b", "c", "d"} & set(args.configs):
        vport = free_port()
        argv_v, env_v = vllm_command(model_dir, port=vport, max_lora_rank=rank, max_loras=args.max_loras,
                                     lora_modules={e.name: e.path for e in entries}, dtype=args.dtype, device=args.device,
                                     python=args.vllm_python, max_num_seqs=args.max_num_seqs)
        vlog = work / "vllm.log"
        vproc = subprocess.Popen(argv_v, cwd=ROOT, env={**env, **env_v}, stdout=open(vlog, "w"), stderr=subprocess.STDOUT)
        sproc = None
        try:
            vurl = f"http://127.0.0.1:{vport}"
            wait_for(vurl + "/v1/models", vproc, vlog, timeout=900)
            if "b" in args.configs:
                port = free_port()
                log = work / "serve_vllm.log"
                sproc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), *serve_common, "--engine", "vllm", "--vllm_url", vurl,
                                          "--vllm_max_lora_rank", str(rank), "--composed_dir", str(work / "composed")],
                                         cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
                wait_for(f"http://127.0.0.1:{port}/health", sproc, log)
                results["b"] = run_client(client_runs(f"http://127.0.0.1:{port}", "auto", model_dir, dataset, args, work, "b"), args, work, "b")
                stop(sproc)
            if "c" in args.configs:
                results["c"] = run_client(client_runs(vurl, "base", model_dir, dataset, args, work, "c", [e.name for e in entries]), args, work, "c")
            if "d" in args.configs:
                results["d"] = run_client(client_runs(vurl, "base", model_dir, dataset, args, work, "d"), args, work, "d")
        finally:
            if sproc is not None:
                stop(sproc)
            stop(vproc)

    import torch

    out = {"command": "python bench/bench_vs_vllm.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "flags": cpu_flags(),
                       "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None},
           "base_model": base_model, "pool": {"adapters": len(entries), "random": args.random_pool, "vllm_max_lora_rank": rank},
           "max_tokens": args.max_tokens, "clients": args.clients, "seconds": round(time.time() - t_start, 1),
           "results": {k: [dict(r, clients=c) for r, c in zip(v, args.clients)] for k, v in results.items()}}
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(table(out))
    print(table(out))
    return 0


NAMES = {"a": "(a) serve.py, `model: auto` (retrieval + top-k mixture, generated here)",
         "b": "(b) serve.py `--engine vllm`, `model: auto` (same mixture, generated by vLLM)",
         "c": "(c) vLLM alone, one random adapter per request",
         "d": "(d) vLLM, base model",
         "e": "(e) serve.py `--no_adapters`, base model (generated here)"}


def cpu_flags() -> list[str]:
    """The vector extensions that decide a CPU step's speed (AVX2, AVX-512, bf16, AMX)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def ratios(out: dict) -> list[str]:
    """The goals' ratios: our base against vLLM's base, our mixture against our base (output tok/s, and TPOT)."""
    res, lines = out["results"], []
    for a, b, label in (("e", "d", "our base model against vLLM's base model"), ("a", "e", "our retrieval + mixture against our base model")):
        if a in res and b in res:
            cells = [f"{c} client{'s' if c > 1 else ''}: {x['output_throughput'] / y['output_throughput']:.2f}x tok/s, "
                     f"TPOT {x['median_tpot_ms']:,.0f} against {y['median_tpot_ms']:,.0f} ms"
                     for c, x, y in zip(out["clients"], res[a], res[b])]
            lines.append(f"- {label}: " + "; ".join(cells))
    return lines


def table(out: dict) -> str:
    cs = out["clients"]
    head = "| server | " + " | ".join(f"{c} client{'s' if c > 1 else ''}: out tok/s | median TTFT | median TPOT" for c in cs) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(cs)]
    for k, runs in out["results"].items():
        cells = []
        for r in runs:
            failed = f" ({r['failed']} failed)" if r.get("failed") else ""
            cells += [f"{r['output_throughput']:.1f}{failed}", f"{r['median_ttft_ms']:,.0f} ms", f"{r['median_tpot_ms']:,.0f} ms"]
        lines.append(f"| {NAMES[k]} | " + " | ".join(cells) + " |")
    extra = ratios(out)
    machine = out["machine"]
    lines += ["", f"{machine['cpu']}, {machine['cores']} cores ({', '.join(machine.get('flags', [])) or 'no AVX2'})."] + ([""] + extra if extra else [])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
