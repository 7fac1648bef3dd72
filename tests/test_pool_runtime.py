"""The served pool in the wild: tiers that batches fit into, and adapters loaded and unloaded while the server runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time

import httpx
import pytest

import serve as serve_mod
from tests.helpers import write_json

CARDS = {
    "alpha": ("sentiment", ["the movie was great", "the actors were wonderful", "a great and wonderful film"]),
    "beta": ("translation", ["translate to french: the cat", "translate to french: the book", "translate to french: the mat"]),
    "gamma": ("closed_book QA", ["question: who wrote the book? answer:", "question: who sits on the mat?", "question: who is the cat?"]),
}
RECIPES = ["bake the chocolate cake with flour and sugar", "a recipe for pancakes with eggs and milk",
           "how long to boil pasta in salted water", "whisk the eggs and fold in the butter"]


@pytest.fixture(scope="module")
def wild(tiny_base, tiny_loras, tmp_path_factory):
    """A pool folder of 3 carded adapters plus 5 more of one shape, and a folder outside it."""
    from tests.helpers import make_lora

    root = tmp_path_factory.mktemp("pool_root")
    paths = {n: shutil.copytree(p, root / n) for n, p in tiny_loras.items()}
    for i in range(5):
        paths[f"extra{i}"] = make_lora(tiny_base, root / f"extra{i}", r=2, alpha=4, seed=200 + i)
    paths["cooking"] = make_lora(tiny_base, root / "cooking", r=4, alpha=8, seed=300)
    outside = tmp_path_factory.mktemp("outside")
    make_lora(tiny_base, outside / "intruder", r=2, alpha=4, seed=301)
    return root, paths, outside


def pool_config(path, paths, names):
    rows = []
    for n in names:
        domain, samples = CARDS.get(n, ("misc", [f"sample {n} one", f"sample {n} two"]))
        rows.append({"model_name": n, "domain": domain, "sample": [{"inputs": s, "targets": "x"} for s in samples], "path": str(paths[n])})
    return write_json(path, rows)


def make_engine(tiny_base, config, *extra):
    from utils.serving.serving_engine import load_engine

    args = serve_mod.build_parser().parse_args(["--base_model", str(tiny_base), "--config_path", str(config), "--device", "cpu",
                                                "--max_new_tokens", "6", "--max_wait_ms", "30", "--max_tokens_cap", "64", *extra])
    serve_mod.validate(args)
    return load_engine(args)


def run(coro):
    return asyncio.run(coro)


async def send_all(app, requests):
    """``requests``: (method, path, body, delay_s); the responses in order (a streamed body is read whole)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:
        async def one(method, path, body, delay):
            await asyncio.sleep(delay)
            if method == "GET":
                return await client.get(path)
            return await client.post(path, json=body)
        return await asyncio.gather(*(one(*r) for r in requests))


async def while_running(app, engine, bodies, path, body):
    """Send the completion ``bodies``, then ``body`` to ``path`` once all of them are decoding; (their replies, its reply)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:
        tasks = [asyncio.create_task(client.post("/v1/completions", json=b)) for b in bodies]
        while len(engine.scheduler.running) < len(bodies):
            await asyncio.sleep(0.001)
        reply = await client.post(path, json=body)
        return [await t for t in tasks], reply


@contextlib.contextmanager
def steps_wait_for_change(engine, rows: int, seen: dict):
    """Once ``rows`` requests decode, their decoding steps wait (the scheduler loop goes on, and runs pool changes
    between two steps) until a watched pool change has recorded ``seen["running"]``: the requests cannot finish before
    the change reaches the router, however slow the machine. At most 60 s."""
    decoder = engine.scheduler.decoder
    step, deadline = decoder.step, time.monotonic() + 60

    def step_after_change(joining=()):
        if not joining and len(engine.scheduler.running) == rows and "running" not in seen and time.monotonic() < deadline:
            return None
        return step(joining)
    decoder.step = step_after_change
    try:
        yield
    finally:
        decoder.step = step


def post(app, path, body):
    return run(send_all(app, [("POST", path, body, 0)]))[0]


def text_of(response):
    if response.headers["content-type"].startswith("text/event-stream"):
        parts = [json.loads(l[6:]) for l in response.text.splitlines() if l.startswith("data: {")]
        return "".join(p["choices"][0]["text"] for p in parts if p.get("choices"))
    return response.json()["choices"][0]["text"]


def test_max_loras_below_lora_num_is_refused_at_start_up(tiny_base, wild, tmp_path, caplog):
    root, paths, _ = wild
    config = pool_config(tmp_path / "pool.json", paths, list(CARDS))
    code = serve_mod.main(["--base_model", str(tiny_base), "--config_path", str(config), "--max_loras", "2", "--lora_num", "3"])
    assert code == 2
    assert "--max_loras 2 is below --lora_num 3" in caplog.text and "raise --max_loras to at least 3" in caplog.text


def test_a_batch_needing_more_adapters_than_max_loras_is_formed_to_fit(tiny_base, wild, tmp_path):
    """--max_loras 3, k = 3, rows needing 7 distinct adapters: every row answers as it does alone, and no step ever has
    more than 3 adapters pinned."""
    from utils.serving.http_api import create_app

    root, paths, _ = wild
    names = list(CARDS) + [f"extra{i}" for i in range(5)]
    engine = make_engine(tiny_base, pool_config(tmp_path / "pool.json", paths, names), "--max_loras", "3", "--max_cpu_loras", "4")
    pool = engine.pool
    peak = {"pinned": 0}
    acquire = pool.acquire

    def watched(names_):
        acquire(names_)
        peak["pinned"] = max(peak["pinned"], len(pool.pinned()))
    pool.acquire = watched
    app = create_app(engine)
    mixes = [["alpha", "beta", "gamma"], ["extra0", "extra1", "extra2"], ["extra3", "extra4", "alpha"],
             ["beta", "extra1", "extra4"], ["gamma", "extra0", "extra3"], ["extra2", "extra3", "extra4"]]
    assert len({n for m in mixes for n in m}) >= 7
    bodies = [{"prompt": f"the cat {i}", "adapters": {n: 0.2 + 0.1 * j for j, n in enumerate(m)}, "max_tokens": 8,
               "stop": ["\x00never"]} for i, m in enumerate(mixes)]
    assert post(app, "/v1/completions", {"prompt": "x", "adapters": {n: 1.0 for n in names[:4]}}).status_code == 400
    engine.scheduler.start()
    try:
        alone = [text_of(post(app, "/v1/completions", b)) for b in bodies]
        engine.scheduler.max_rows_seen = 0
        together = run(send_all(app, [("POST", "/v1/completions", b, 0) for b in bodies]))
        assert all(r.status_code == 200 for r in together)
        assert [text_of(r) for r in together] == alone
        assert peak["pinned"] <= 3
        stats = pool.describe()
        assert stats["evictions_device"] > 0 and stats["evictions_host"] > 0 and stats["pinned"] == 0
        health = run(send_all(app, [("GET", "/health", None, 0)]))[0].json()
        assert health["pool"]["max_loras"] == 3 and health["pool"]["loads"] == stats["loads"]
        metrics = run(send_all(app, [("GET", "/metrics", None, 0)]))[0].text
        assert 'lora_retriever_adapters_resident{tier="device"}' in metrics and "lora_retriever_adapter_evictions_total" in metrics
    finally:
        engine.scheduler.stop()


def test_load_while_streaming_then_retrieve_then_unload(tiny_base, wild, tmp_path):
    from utils.serving.http_api import create_app

    root, paths, outside = wild
    engine = make_engine(tiny_base, pool_config(tmp_path / "pool.json", paths, list(CARDS)))
    app = create_app(engine)
    engine.scheduler.start()
    try:
        streams = [{"prompt": f"the movie {i}", "model": ["alpha", "beta", "gamma", "auto"][i % 4], "max_tokens": 60,
                    "ignore_eos": True, "stream": True} for i in range(8)]
        seen = {}
        add = engine.router.add

        def watched_add(*a, **k):  # runs on the scheduler thread, between two decoding steps
            seen["running"] = len(engine.scheduler.running)
            return add(*a, **k)
        engine.router.add = watched_add
        before = [text_of(r) for r in run(send_all(app, [("POST", "/v1/completions", b, 0) for b in streams]))]
        load = {"lora_name": "cooking", "lora_path": str(paths["cooking"]), "domain": "recipes", "samples": [{"inputs": s} for s in RECIPES]}
        with steps_wait_for_change(engine, len(streams), seen):
            replies, loaded = run(while_running(app, engine, streams, "/v1/load_lora_adapter", load))
        replies = replies + [loaded]
        assert replies[-1].status_code == 200, replies[-1].text
        assert replies[-1].json()["retrievable"] is True
        assert seen["running"] == 8, "the load happened while the 8 streams were decoding"
        assert [text_of(r) for r in replies[:-1]] == before, "streams running across the load are unaffected"
        models = [m["id"] for m in run(send_all(app, [("GET", "/v1/models", None, 0)]))[0].json()["data"]]
        assert "cooking" in models
        r = post(app, "/v1/completions", {"prompt": "a recipe to bake a cake with eggs, flour and sugar", "lora_num": 1, "max_tokens": 3})
        assert r.json()["adapters"][0]["name"] == "cooking"
        assert post(app, "/v1/completions", {"prompt": "x", "model": "cooking", "max_tokens": 2}).status_code == 200
        # taken name, outside the roots (directly, through '..', through a symlink), a broken adapter: the pool is unchanged
        assert post(app, "/v1/load_lora_adapter", load).status_code == 400
        (root / "link").symlink_to(outside / "intruder")
        for path in (str(outside / "intruder"), str(root / ".." / outside.name / "intruder"), str(root / "link")):
            r = post(app, "/v1/load_lora_adapter", {"lora_name": "intruder", "lora_path": path})
            assert r.status_code == 403 and "outside the adapter roots" in r.json()["error"]["message"], r.text
        broken = root / "broken"
        shutil.copytree(paths["extra0"], broken)
        (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
        r = post(app, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(broken), "samples": ["the cat"]})
        assert r.status_code == 400 and "'broken'" in r.json()["error"]["message"]
        assert engine.pool.names == list(CARDS) + ["cooking"] and engine.router.retriever.names == list(CARDS) + ["cooking"]
        # without samples: by name only
        r = post(app, "/v1/load_lora_adapter", {"lora_name": "plain", "lora_path": str(paths["extra1"])})
        assert r.status_code == 200 and r.json()["retrievable"] is False
        assert "plain" not in engine.router.retriever.names
        assert post(app, "/v1/completions", {"prompt": "x", "model": "plain", "max_tokens": 2}).json()["adapters"][0]["name"] == "plain"
        # unload: no longer retrieved, no longer nameable
        assert post(app, "/v1/unload_lora_adapter", {"lora_name": "cooking"}).status_code == 200
        r = post(app, "/v1/completions", {"prompt": "a recipe to bake a cake with eggs, flour and sugar", "lora_num": 1, "max_tokens": 3})
        assert r.json()["adapters"][0]["name"] != "cooking"
        assert post(app, "/v1/completions", {"prompt": "x", "model": "cooking"}).status_code == 404
        assert post(app, "/v1/unload_lora_adapter", {"lora_name": "cooking"}).status_code == 404
    finally:
        engine.scheduler.stop()


def test_unload_while_a_request_uses_the_adapter(tiny_base, wild, tmp_path):
    """A request running with an adapter finishes with it, as it would have without the unload."""
    from utils.serving.http_api import create_app

    root, paths, _ = wild
    engine = make_engine(tiny_base, pool_config(tmp_path / "pool.json", paths, list(CARDS)))
    app = create_app(engine)
    engine.scheduler.start()
    try:
        body = {"prompt": "question: who is the cat?", "model": "gamma", "max_tokens": 64, "ignore_eos": True}
        alone = text_of(post(app, "/v1/completions", body))
        seen = {}
        remove = engine.router.remove

        def watched_remove(name):
            seen["running"] = [j.adapter_names for j in engine.scheduler.running]
            return remove(name)
        engine.router.remove = watched_remove
        with steps_wait_for_change(engine, 1, seen):
            (r,), u = run(while_running(app, engine, [body], "/v1/unload_lora_adapter", {"lora_name": "gamma"}))
        assert u.status_code == 200 and r.status_code == 200
        assert seen["running"] == [("gamma",)], "the unload came while the request was decoding with gamma"
        assert text_of(r) == alone
        assert "gamma" not in engine.pool.names and not engine.pool.pinned()
    finally:
        engine.scheduler.stop()


def test_pool_routes_need_the_key_or_a_loopback_bind(tiny_base, wild, tmp_path):
    from utils.serving.http_api import create_app

    root, paths, _ = wild
    engine = make_engine(tiny_base, pool_config(tmp_path / "pool.json", paths, list(CARDS)))
    body = {"lora_name": "cooking", "lora_path": str(paths["cooking"])}
    r = post(create_app(engine, bind_host="0.0.0.0"), "/v1/load_lora_adapter", body)
    assert r.status_code == 403 and "--api_key" in r.json()["error"]["message"]
    keyed = create_app(engine, api_key="secret", bind_host="0.0.0.0")
    assert post(keyed, "/v1/load_lora_adapter", body).status_code == 401
    assert engine.pool.names == list(CARDS)


def test_a_card_less_adapter_loaded_at_run_time_is_scored_in_the_background_and_routed_to(tiny_base, wild, tmp_path):
    """--routing lorauter: an adapter loaded without samples is scored on the task library between decoding steps,
    while requests are served, then joins the rankings. Here it is a copy of the adapter that ranks first on the first
    task, under a name that sorts before it: the same scores (read from the cache, which keys scores by content), so it
    takes the first place on every task its original led, and a request for that task is routed to it."""
    from utils.serving.http_api import create_app

    root, paths, _ = wild
    engine = make_engine(tiny_base, pool_config(tmp_path / "pool.json", paths, list(CARDS)), "--routing", "lorauter",
                         "--task_scores", str(tmp_path / "scores.json"))
    index = engine.router.tasks
    first = index.names[0]
    leader = index.rankings[first][0]
    led = [t for t, r in index.rankings.items() if r[0] == leader]
    copy = shutil.copytree(paths[leader], root / "aa_copy")
    app = create_app(engine)
    engine.scheduler.start()
    try:
        prompt = CARDS[first][1][0]
        r = post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2})  # the server's default: through tasks
        assert r.status_code == 200 and r.json()["adapters"][0]["name"] == leader
        streams = [{"prompt": f"the movie {i}", "model": "auto", "routing": "retrieval", "max_tokens": 30, "ignore_eos": True}
                   for i in range(3)]
        replies, loaded = run(while_running(app, engine, streams, "/v1/load_lora_adapter",
                                            {"lora_name": "aa_copy", "lora_path": str(copy)}))
        assert loaded.status_code == 200 and loaded.json()["task_scoring"] == "queued" and loaded.json()["retrievable"] is False
        assert all(x.status_code == 200 for x in replies)
        assert engine.scoring.wait_idle(120)
        health = run(send_all(app, [("GET", "/health", None, 0)]))[0].json()["task_scoring"]
        assert health["scored"] == {"aa_copy": led} and health["queued"] == [] and health["scoring"] is None
        assert health["failed"] == {}
        m = index.matrix
        np_scores = {a: m.scores[:, m.adapters.index(a)].tolist() for a in (leader, "aa_copy")}
        assert np_scores["aa_copy"] == np_scores[leader]
        r = post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "routing": "lorauter"})
        assert [a["name"] for a in r.json()["adapters"]][0] == "aa_copy"
        metrics = run(send_all(app, [("GET", "/metrics", None, 0)]))[0].text
        assert "lora_retriever_task_scored_total 1.0" in metrics
        # unloaded: no task routes to it any more
        assert post(app, "/v1/unload_lora_adapter", {"lora_name": "aa_copy"}).status_code == 200
        assert all("aa_copy" not in r for r in index.rankings.values())
        r = post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "routing": "lorauter"})
        assert r.json()["adapters"][0]["name"] == leader
        r = post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "routing": "tasks"})
        assert r.status_code == 400
        # an adapter of new content is scored for real, through the decoder's composition, while requests run
        replies, loaded = run(while_running(app, engine, streams, "/v1/load_lora_adapter",
                                            {"lora_name": "fresh", "lora_path": str(paths["extra0"])}))
        assert loaded.status_code == 200 and all(x.status_code == 200 for x in replies)
        assert engine.scoring.wait_idle(120) and "fresh" in engine.scoring.status()["scored"]
        live = index.matrix.scores[:, index.matrix.adapters.index("fresh")].tolist()
    finally:
        engine.scoring.close()
        engine.scheduler.stop()
    # the same scores computed alone, outside the server, with a composition of their own
    from utils.task_scores import TaskScorer

    alone = TaskScorer(engine.pool, engine.tokenizer, engine.prompter, {"fresh": str(paths["extra0"])}, "loglik")
    want = [alone.scores(t, ["fresh"], index.matrix.top_rows(t.name))[0][0] for t in index.tasks]
    assert live == pytest.approx(want, abs=1e-5)
