"""The command that starts vLLM's OpenAI server for a pool, as ``--engine vllm`` needs it (``bench/start_vllm.sh``,
``bench/bench_vs_vllm.py`` and the tests start vLLM through it)."""

from __future__ import annotations

from pathlib import Path

TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def vllm_command(model_dir: str, port: int = 8100, max_lora_rank: int = 32, max_loras: int = 16, lora_modules: dict | None = None,
                 dtype: str = "float32", device: str = "cpu", python: str = ".venv-vllm/bin/python", max_model_len: int = 2048,
                 max_num_seqs: int = 32, served_name: str = "base", extra: list[str] | None = None) -> tuple[list[str], dict]:
    """(argv, environment) that start vLLM's OpenAI server the way ``--engine vllm`` needs it: LoRA on, runtime loads
    allowed, the base model served as ``served_name``; on CPU, vLLM's CPU build with a bounded KV cache and one OpenMP
    thread per core. ``lora_modules``: adapters registered at start-up ({name: path}), for clients that name them."""
    import os

    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_NO_USAGE_STATS": "1"}
    if Path(model_dir).is_dir() and all(Path(p).is_dir() for p in (lora_modules or {}).values()):
        env["HF_HUB_OFFLINE"] = "1"  # everything is local: vLLM never asks the Hub (hub ids keep their download)
    if device == "cpu":
        # vLLM's CPU docs ask for tcmalloc: with glibc's allocator its steps spend most of their time in the kernel
        # (measured here: 32 requests of 10 tokens over 5 LoRAs took 108 s without it, 42 s with it).
        tcmalloc = next((p for p in TCMALLOC if Path(p).exists()), None)
        if tcmalloc and "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(x for x in (tcmalloc, os.environ.get("LD_PRELOAD")) if x)
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
                   VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}"))
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", served_name,
            "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(max_loras, len(lora_modules or {}))), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port)]
    if lora_modules:
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in lora_modules.items())]
    return argv + list(extra or []), env
