"""What the benchmarks share: free ports, waiting for a server, stopping it, a pool of random LoRAs, writing results."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def cpu_name(default: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is only the architecture on Linux); where it
    cannot be read, ``default``, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if default is not None:
        return default
    import platform

    return platform.processor() or platform.machine()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def random_pool(folder: Path, base_model: str) -> Path:
    """13 LoRAs of the embedded pool's shape (r 8, alpha 16, q_proj/v_proj), random factors, with the suite's cards."""
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.model_loading import load_base_model

    suite = json.loads((ROOT / "config" / "bigbench_pool.json").read_text())
    for i, e in enumerate(suite):
        out = folder / e["model_name"]
        if (out / "adapter_config.json").exists():
            continue
        torch.manual_seed(i)
        model = get_peft_model(load_base_model(base_model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        model.save_pretrained(out)
    config = folder / "pool.json"
    config.write_text(json.dumps([dict(e, path=str(folder / e["model_name"])) for e in suite], indent=1))
    return config


def embedded_random_pool(work: Path):
    """The embedded SmolLM2 (float32, CPU), its tokenizer and an :class:`AdapterPool` over :func:`random_pool`'s 13
    LoRAs under ``work`` (built when missing): (tokenizer, pool, adapter names); the model is ``pool.model``."""
    from utils.adapter_pool import AdapterPool
    from utils.data import load_pool_config
    from utils.model_loading import load_base_model, load_tokenizer

    base = "embedded:smollm2-135m-instruct"
    entries = load_pool_config(str(random_pool(Path(work), base)))
    pool = AdapterPool(load_base_model(base, dtype="float32", device="cpu"), entries, show_progress=False)
    return load_tokenizer(base), pool, [e.name for e in entries]


def step_times(model, tok, live, rows: list[tuple[list[int], list[str]]], steps: int, warmup: int = 3):
    """Decode ``rows`` (prompt ids, adapters of an equal-weight mixture; [] for a base row) together with the
    decoder every entry shares (:class:`utils.decoding.BatchDecoder`, ``live`` a :class:`LiveComposition`):
    (median milliseconds of ``steps`` steps after ``warmup`` more, each row's greedy tokens)."""
    import statistics

    from utils.decoding import BatchDecoder, Sequence

    decoder = BatchDecoder(model, tok, live, context_length=4096, live_text=False)
    seqs = [Sequence(prompt_ids=ids, max_new_tokens=steps + warmup + 5, ignore_eos=True, adapters=list(names),
                     adapter_w=[1 / len(names)] * len(names) if names else []) for ids, names in rows]
    with live.active():
        decoder.add(seqs)
        for _ in range(warmup):
            decoder.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            decoder.step()
            times.append(1000 * (time.perf_counter() - t0))
        decoder.reset()
    return statistics.median(times), [s.generated for s in seqs]


def write_result(out: str | Path, result: dict, lines: list[str]) -> None:
    """Write a benchmark's figures to OUT.json and its table (``lines``) to OUT.md and stdout."""
    out = Path(out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
