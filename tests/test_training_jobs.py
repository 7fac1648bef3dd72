"""Growing the pool from examples: ``POST /v1/adapters/train`` on a real ``serve.py`` process, the training in its own
process, the adapter joining the pool and retrieval when it is ready."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import write_json
from tests.test_serve_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
CARDS = {
    "alpha": ("sentiment", ["the movie was great", "the actors were wonderful", "a great and wonderful film"]),
    "beta": ("translation", ["translate to french: the cat", "translate to french: the book", "translate to french: the mat"]),
}
COOKING = [{"inputs": f"recipe {i}: how long to bake the {food} with flour and sugar", "targets": f"{20 + i} minutes"}
           for i, food in enumerate(["cake", "bread", "pie", "cookies", "muffins", "scones", "tart", "brownies", "buns", "rolls",
                                     "bagels", "pretzels"])]


def wait_state(url: str, job_id: str, states, timeout: float = 180.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/v1/adapters/train/{job_id}", timeout=10).json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {states}: {job}")


@pytest.fixture()
def tiny_server(tiny_base, tiny_loras, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    pool = [{"model_name": n, "domain": d, "sample": [{"inputs": s, "targets": "x"} for s in ss], "path": str(tiny_loras[n])}
            for n, (d, ss) in CARDS.items()]
    server = ServerProcess(["--base_model", str(tiny_base), "--config_path", str(write_json(tmp_path / "pool.json", pool)),
                            "--training_root", str(root), "--pool_state", str(tmp_path / "state.json"), "--max_training_queue", "1",
                            "--max_train_body_bytes", "20000", "--training_card_size", "3", "--lora_num", "1"], tmp_path / "server.log")
    server.wait_ready()
    yield server, root, tmp_path
    server.stop()


@pytest.mark.slow
def test_bad_requests_are_refused_and_write_nothing(tiny_server):
    server, root, _ = tiny_server
    url = server.url + "/v1/adapters/train"
    good = {"name": "cooking", "domain": "recipes", "examples": COOKING}
    cases = [
        (dict(good, examples=COOKING[:7]), 400, "8 to 5000"),  # too few
        (dict(good, name="alpha"), 400, "already in the pool"),  # a name in the pool
        (dict(good, name="base"), 400, "'name'"),
        (dict(good, examples=COOKING[:8] + [{"inputs": "x", "targets": " "}]), 400, "empty 'targets'"),
        (dict(good, settings={"stepz": 3}), 400, "Unknown training settings ['stepz']"),
        (dict(good, settings={"steps": 0}), 400, "steps must be at least 1"),
        (dict(good, settings={"learning_rate": "abc"}), 400, "learning_rate must be a number (got 'abc', a str)"),
        (dict(good, settings={"steps": 2.5}), 400, "steps must be a whole number"),
        (dict(good, settings={"base_model": "other"}), 400, "Unknown training settings ['base_model']"),
        (dict(good, examples=COOKING * 100), 413, "--max_train_body_bytes"),  # the body over the limit
        (dict(good, colour="red"), 400, "Unknown fields"),
    ]
    for body, status, words in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (body.get("name"), r.text)
        assert words in r.json()["error"]["message"], r.text
    assert list(root.iterdir()) == []
    assert httpx.get(url, timeout=10).json()["data"] == []
    assert httpx.get(url + "/trainjob-nope", timeout=10).status_code == 404


@pytest.mark.slow
def test_a_job_trains_joins_the_pool_and_retrieval_and_survives_a_restart(tiny_server, tiny_base, tiny_loras):
    server, root, d = tiny_server
    r = httpx.post(server.url + "/v1/adapters/train", json={"name": "cooking", "domain": "recipes", "examples": COOKING,
                                                             "settings": {"steps": 6, "r": 4}}, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "training") and job["train_examples"] == 9 and job["card_examples"] == 3
    # the server answers while the job trains
    assert httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "the movie", "max_tokens": 4}, timeout=60).status_code == 200
    done = wait_state(server.url, job["id"], ("ready", "failed"))
    assert done["state"] == "ready", done
    assert done["step"] == 6 and len(done["losses"]) == 6 and done["elapsed_s"] > 0
    assert [e["message"].split(":")[0].split(" ")[0] for e in done["events"]][:2] == ["Job", "Training"]
    folder = root / "cooking"
    assert json.loads((folder / "training.json").read_text())["losses"] == done["losses"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left
    models = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]
    assert "cooking" in models
    # its card joined retrieval: a recipe question retrieves it
    r = httpx.post(server.url + "/v1/completions", json={"model": "auto", "lora_num": 1, "prompt": COOKING[0]["inputs"], "max_tokens": 4},
                   timeout=60).json()
    assert r["adapters"][0]["name"] == "cooking"
    # the pool state records it: a restart comes back with it
    state = json.loads((d / "state.json").read_text())
    assert [x["lora_name"] for x in state["loaded"]] == ["cooking"]
    assert httpx.post(server.url + "/v1/adapters/train", json={"name": "cooking", "examples": COOKING}, timeout=30).status_code == 400


@pytest.mark.slow
def test_cancel_kill_and_queue_limits(tiny_server):
    server, root, _ = tiny_server
    url = server.url + "/v1/adapters/train"
    long = {"steps": 100000}
    first = httpx.post(url, json={"name": "long1", "examples": COOKING, "settings": long}, timeout=30).json()
    job = wait_state(server.url, first["id"], ("training",))
    second = httpx.post(url, json={"name": "long2", "examples": COOKING, "settings": long}, timeout=30)
    assert second.status_code == 202 and second.json()["state"] == "queued"  # --max_training_jobs 1: it waits
    third = httpx.post(url, json={"name": "long3", "examples": COOKING, "settings": long}, timeout=30)
    assert third.status_code == 429 and third.headers.get("retry-after")  # --max_training_queue 1
    wait = time.time() + 60
    while not httpx.get(f"{url}/{first['id']}", timeout=10).json()["step"] and time.time() < wait:
        time.sleep(0.3)
    # DELETE while training: cancelled, nothing written
    r = httpx.delete(f"{url}/{first['id']}", timeout=30).json()
    assert r["state"] == "cancelled" and r["error"] is None
    job = wait_state(server.url, second.json()["id"], ("training",))
    pid = int(re.search(r"process (\d+)", job["events"][-1]["message"]).group(1))
    os.kill(pid, signal.SIGKILL)  # the training worker dies: the job fails with the reason, the pool is unchanged
    failed = wait_state(server.url, job["id"], ("failed",), timeout=60)
    assert "killed by signal 9" in failed["error"]
    assert list(root.iterdir()) == []
    models = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]
    assert models == ["auto", "base", "alpha", "beta"]


@pytest.mark.slow
def test_sigterm_during_training_cancels_the_job_and_exits_0(tiny_server):
    server, root, _ = tiny_server
    job = httpx.post(server.url + "/v1/adapters/train", json={"name": "long", "examples": COOKING, "settings": {"steps": 100000}},
                     timeout=30).json()
    wait_state(server.url, job["id"], ("training",))
    deadline = time.time() + 60  # the training process has taken a step: it is really training
    while not httpx.get(f"{server.url}/v1/adapters/train/{job['id']}", timeout=10).json()["step"] and time.time() < deadline:
        time.sleep(0.1)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert list(root.iterdir()) == []  # the cancelled job left no folder


@pytest.mark.slow
def test_a_task_missing_from_the_pool_is_learned_from_its_rows_and_then_retrieved(tmp_path):
    """The embedded models, a pool of three (untrained) adapters without sports_understanding; its training rows are
    posted, and once the adapter is ready its test prompts retrieve it and its answers beat the pool without it."""
    from tests.helpers import make_smollm_pool
    from utils.metrics import em

    task = "sports_understanding"
    pool = make_smollm_pool(tmp_path / "pool")
    test_rows = json.loads((ROOT / "data" / "bigbench" / "test" / f"{task}.json").read_text())
    train_rows = json.loads((ROOT / "data" / "bigbench" / "train" / f"{task}.json").read_text())
    server = ServerProcess(["--config_path", str(pool), "--max_new_tokens", "6", "--training_root", str(tmp_path / "trained")],
                           tmp_path / "server.log")
    try:
        server.wait_ready()

        def answers():
            out = []
            for r in test_rows:
                body = httpx.post(server.url + "/v1/completions", json={"model": "auto", "prompt": r["inputs"], "max_tokens": 6},
                                  timeout=120).json()
                out.append((body["choices"][0]["text"].strip(), [a["name"] for a in body["adapters"]]))
            return out

        before = answers()
        t0 = time.time()
        job = httpx.post(server.url + "/v1/adapters/train", json={"name": task, "domain": "commonsense", "examples": train_rows},
                         timeout=60)
        assert job.status_code == 202, job.text
        done = wait_state(server.url, job.json()["id"], ("ready", "failed"), timeout=900)
        assert done["state"] == "ready", done
        seconds = time.time() - t0
        after = answers()
        top1 = sum(names[0] == task for _, names in after)
        em_before = sum(em(t, r["targets"]) for (t, _), r in zip(before, test_rows)) / len(test_rows)
        em_after = sum(em(t, r["targets"]) for (t, _), r in zip(after, test_rows)) / len(test_rows)
        report = {"task": task, "test_rows": len(test_rows), "train_examples": done["train_examples"], "card": done["card_examples"],
                  "steps": done["steps"], "job_seconds": round(seconds, 1), "first_loss": done["losses"][0], "last_loss": done["losses"][-1],
                  "retrieved_first": top1, "em_before": em_before, "em_after": em_after}
        (ROOT / "tests" / "artefacts").mkdir(exist_ok=True)
        (ROOT / "tests" / "artefacts" / "grow_the_pool.json").write_text(json.dumps(report, indent=1))
        print("grow the pool:", json.dumps(report))
        assert top1 > len(test_rows) / 2, report  # most of its test prompts retrieve the new adapter first
        assert em_after > em_before, report
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_training_routes_need_the_api_key_when_one_is_set(tiny_base, tiny_loras, tmp_path):
    pool = [{"model_name": "alpha", "domain": "sentiment", "sample": [{"inputs": "the movie was great", "targets": "x"}],
             "path": str(tiny_loras["alpha"])}]
    server = ServerProcess(["--base_model", str(tiny_base), "--config_path", str(write_json(tmp_path / "pool.json", pool)),
                            "--lora_num", "1", "--api_key", "secret", "--training_root", str(tmp_path / "trained")], tmp_path / "server.log")
    try:
        server.wait_ready()
        body = {"name": "cooking", "examples": COOKING, "settings": {"steps": 100000}}
        url = server.url + "/v1/adapters/train"
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        assert httpx.get(url, timeout=30).status_code == 401
        key = {"Authorization": "Bearer secret"}
        job = httpx.post(url, json=body, headers=key, timeout=30)
        assert job.status_code == 202
        assert httpx.delete(f"{url}/{job.json()['id']}", timeout=30).status_code == 401
        assert httpx.delete(f"{url}/{job.json()['id']}", headers=key, timeout=30).json()["state"] == "cancelled"
    finally:
        assert server.stop() == 0
