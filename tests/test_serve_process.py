"""``python serve.py`` as a real process on a free local port, talked to over HTTP as users do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.helpers import write_json

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python serve.py ARGS`` on a free port; :meth:`wait_ready` polls /health."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(self.port), "--device", "cpu", *args],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"serve.py did not become ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture()
def tiny_pool(tiny_base, tiny_loras, tmp_path):
    pool = [{"model_name": n, "domain": d, "sample": [{"inputs": f"{n} sample {i}", "targets": "x"} for i in range(3)],
             "path": str(tiny_loras[n])} for n, d in (("alpha", "sentiment"), ("beta", "translation"), ("gamma", "qa"))]
    return write_json(tmp_path / "pool.json", pool)


def test_sigterm_finishes_in_flight_and_disconnects_leave_alone(tiny_base, tiny_pool, tmp_path):
    server = ServerProcess(["--base_model", str(tiny_base), "--config_path", str(tiny_pool), "--max_tokens_cap", "300"],
                           tmp_path / "server.log")
    try:
        server.wait_ready()
        long_req = {"prompt": "alpha sample", "max_tokens": 200, "stop": ["\x00never"], "model": "gamma"}
        alone = httpx.post(server.url + "/v1/completions", json=long_req, timeout=120).json()["choices"][0]["text"]

        # A streaming client that goes away after its first chunks while another request runs beside it.
        results = {}

        def other():
            results["other"] = httpx.post(server.url + "/v1/completions", json=long_req, timeout=120).json()

        t = threading.Thread(target=other)
        t.start()
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "beta", "max_tokens": 250, "stream": True, "stop": ["\x00never"]}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break  # leaving the block closes the connection mid-stream
        t.join(120)
        assert results["other"]["choices"][0]["text"] == alone
        deadline = time.time() + 20
        while httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
            time.sleep(0.2)
        assert httpx.get(server.url + "/health").json()["running"] == 0  # the abandoned row left the batch

        # SIGTERM while a request is in flight: it is answered in full, then the process exits 0.
        def in_flight():
            results["flight"] = httpx.post(server.url + "/v1/completions", json=long_req, timeout=120)

        t = threading.Thread(target=in_flight)
        t.start()
        deadline = time.time() + 60  # the request is in flight once the server shows a running row
        while not httpx.get(server.url + "/health").json()["running"] and time.time() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert results["flight"].status_code == 200 and results["flight"].json()["choices"][0]["text"] == alone
        assert server.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_serve_refuses_bad_flags_before_loading(tmp_path):
    for argv, words in ((["--device", "tpu9"], "tpu9"), (["--temperature", "-1"], "--temperature"), (["--port", "0"], "--port"),
                        (["--config_path", str(tmp_path / "missing.json")], "missing.json")):
        proc = subprocess.run([sys.executable, "serve.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def smollm_loras(tmp_path_factory):
    from tests.helpers import make_smollm_pool

    return make_smollm_pool(tmp_path_factory.mktemp("smollm_loras"))


@pytest.mark.slow
def test_openai_client_against_embedded_default(smollm_loras, tmp_path):
    """The official ``openai`` client, unchanged, against serve.py on SmolLM2 + MiniLM."""
    from openai import OpenAI

    server = ServerProcess(["--config_path", str(smollm_loras), "--api_key", "k-test", "--lora_num", "2"], tmp_path / "server.log")
    try:
        server.wait_ready()
        client = OpenAI(base_url=server.url + "/v1", api_key="k-test")
        assert {m.id for m in client.models.list().data} >= {"auto", "base", "snarks", "winowhy", "qa_wikidata"}
        sarcasm = ("Which statement is sarcastic?\n\nOPTIONS:\n- (a) Great, another meeting that could have been an email.\n"
                   "- (b) The meeting ended early.")
        c = client.completions.create(model="auto", prompt=sarcasm, max_tokens=12)
        assert c.choices[0].text and c.usage.completion_tokens <= 12
        assert c.adapters[0]["name"] == "snarks" and len(c.adapters) == 2  # extra fields come through the client
        chat = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": sarcasm}], max_tokens=8)
        assert chat.choices[0].message.content and chat.adapters[0]["name"] == "snarks"
        pieces = []
        for chunk in client.chat.completions.create(model="winowhy", messages=[{"role": "user", "content": "Why?"}], max_tokens=8,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                assert chunk.usage.completion_tokens <= 8
        assert "".join(pieces)
        mixed = client.completions.create(model="auto", prompt="The capital of France is", max_tokens=6,
                                          extra_body={"adapters": {"qa_wikidata": 0.7, "winowhy": 0.3}, "composition": "fusion"})
        assert [(a["name"], a["weight"]) for a in mixed.adapters] == [("qa_wikidata", 0.7), ("winowhy", 0.3)]
        assert mixed.composition == "fusion"
        # the fields the field's clients send: logprobs with echo, a list of prompts, token ids, n, chat logprobs
        scored = client.completions.create(model="auto", prompt=[sarcasm, "The capital of France is"], max_tokens=2, logprobs=2, echo=True)
        assert [c.index for c in scored.choices] == [0, 1] and sarcasm in scored.choices[0].text  # the rendered prompt
        lp = scored.choices[1].logprobs
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
        ids = client.completions.create(model="base", prompt=[[504, 3575, 282, 4649, 314]], max_tokens=3, extra_body={"prompt_format": "raw"})
        assert ids.choices[0].text and ids.usage.prompt_tokens == 5
        sampled = client.completions.create(model="snarks", prompt="Is it sarcastic?", n=3, temperature=1.0, seed=3, max_tokens=6)
        assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
        chat_lp = client.chat.completions.create(model="winowhy", messages=[{"role": "user", "content": "Why?"}], max_tokens=4,
                                                 logprobs=True, top_logprobs=2)
        assert all(len(t.top_logprobs) == 2 for t in chat_lp.choices[0].logprobs.content)
        import openai

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    finally:
        assert server.stop() == 0


def test_pool_state_brings_back_the_same_pool_after_a_restart(tiny_base, tiny_loras, tiny_pool, tmp_path):
    """Runtime loads and unloads recorded in --pool_state: a restarted server lists the same models and retrieves the
    loaded adapter from its card; the state file is never left half-written."""
    import shutil

    root = tmp_path / "adapters"
    shutil.copytree(tiny_loras["alpha"], root / "newcomer")
    state = tmp_path / "state" / "pool_state.json"
    args = ["--base_model", str(tiny_base), "--config_path", str(tiny_pool), "--adapter_root", str(root), "--pool_state", str(state)]
    server = ServerProcess(args, tmp_path / "first.log")
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/v1/load_lora_adapter", timeout=60,
                       json={"lora_name": "newcomer", "lora_path": str(root / "newcomer"), "domain": "cooking",
                             "samples": ["bake a chocolate cake", "a recipe for pancakes", "boil the pasta"]})
        assert r.status_code == 200, r.text
        assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "beta"}, timeout=60).status_code == 200
        before = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    finally:
        assert server.stop() == 0
    assert json.loads(state.read_text())["unloaded"] == ["beta"]
    assert [p.name for p in state.parent.iterdir()] == ["pool_state.json"], "no temporary file is left behind"
    again = ServerProcess(args, tmp_path / "second.log")
    try:
        again.wait_ready()
        after = httpx.get(again.url + "/v1/models", timeout=10).json()["data"]
        assert [(m["id"], m["domain"]) for m in after] == [(m["id"], m["domain"]) for m in before]
        assert "beta" not in [m["id"] for m in after] and "newcomer" in [m["id"] for m in after]
        r = httpx.post(again.url + "/v1/completions", timeout=60, json={"prompt": "a recipe to bake a cake", "lora_num": 1, "max_tokens": 2})
        assert r.json()["adapters"][0]["name"] == "newcomer"
    finally:
        assert again.stop() == 0
