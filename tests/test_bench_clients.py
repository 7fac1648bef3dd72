"""guidellm, a benchmark client the field points at OpenAI-compatible servers, run unchanged against serve.py.

guidellm pins its own dependencies, so it lives in a virtualenv of its own, ``.venv-clients`` (``make clients``;
``make test`` builds it). It checks ``/health``, reads ``/v1/models``, streams chat completions with
``stream_options.continuous_usage_stats`` and counts tokens from the usage the server reports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.test_serve_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
GUIDELLM = ROOT / ".venv-clients" / "bin" / "guidellm"


def counter(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
@pytest.mark.skipif(not GUIDELLM.exists(), reason="guidellm is not installed: run `make clients` (it builds .venv-clients)")
def test_guidellm_fixed_run_has_no_failures_and_its_token_counts_match_usage(tmp_path):
    from tests.helpers import make_smollm_pool
    from utils.model_loading import resolve_model_path

    tokenizer = resolve_model_path("embedded:smollm2-135m-instruct")
    pool = make_smollm_pool(tmp_path / "pool")
    server = ServerProcess(["--config_path", str(pool)], tmp_path / "server.log")
    try:
        server.wait_ready()
        before = httpx.get(server.url + "/metrics", timeout=10).text
        out = tmp_path / "guidellm.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run([str(GUIDELLM), "run", "--backend", f"kind=openai_http,target={server.url}",
                               "--profile", "kind=concurrent,streams=4", "--constraint", "kind=max_requests,count=16",
                               "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
                               "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                               "--output", f"kind=json,path={out}", "--disable-console-interactive"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        after = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        assert server.stop() == 0
    bench = json.loads(out.read_text())["benchmarks"][0]
    requests = bench["requests"]
    assert len(requests["successful"]) == 16 and not requests["errored"] and not requests["incomplete"]
    assert all(r["output_tokens"] == 8 for r in requests["successful"])
    assert all(r["output_tokens_per_iteration"] == 1.0 for r in requests["successful"]), "one token per streamed chunk"
    prompt = counter(after, "lora_retriever_prompt_tokens_total") - counter(before, "lora_retriever_prompt_tokens_total")
    generated = counter(after, "lora_retriever_generation_tokens_total") - counter(before, "lora_retriever_generation_tokens_total")
    assert sum(r["prompt_tokens"] for r in requests["successful"]) == prompt
    assert sum(r["output_tokens"] for r in requests["successful"]) == generated
