"""The server's API on the tiny in-process model: schemas, errors, and batched-equals-alone under greedy decoding."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from tests.helpers import SERVE_TASKS as TASKS


@pytest.fixture(scope="module")
def engine(tiny_base, tiny_loras, tmp_path_factory):
    from tests.helpers import tiny_engine

    eng = tiny_engine(tiny_base, tiny_loras, tmp_path_factory.mktemp("serve_pool"))
    eng.scheduler.start()
    yield eng
    eng.scheduler.stop()


@pytest.fixture(scope="module")
def app(engine):
    from utils.serving.http_api import create_app

    return create_app(engine, max_body_bytes=4096)


def run(coro):
    return asyncio.run(coro)


async def post_all(app, bodies, path="/v1/completions"):
    """Send ``bodies`` concurrently and return the responses in order."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        async def one(body):
            return await client.post(path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                                     headers={"Content-Type": "application/json"})
        return await asyncio.gather(*(one(b) for b in bodies))


async def until(condition, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until it holds (the scheduler's state, never a guessed delay)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the scheduler never reached the awaited state")
        await asyncio.sleep(0.005)


async def post_staggered(app, sched, first, others, path="/v1/completions"):
    """``first``, then each of ``others`` once the scheduler has taken two more decoding steps with ``first`` running:
    they join a batch that is already decoding, at different steps."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        def send(body):
            return asyncio.create_task(client.post(path, json=body))

        tasks = [send(first)]
        await until(lambda: sched.stats()["running"] >= 1)
        start = sched.stats()["steps"]
        for i, body in enumerate(others):
            await until(lambda i=i: sched.stats()["steps"] >= start + 2 * (i + 1) or tasks[0].done())
            tasks.append(send(body))
        return await asyncio.gather(*tasks)


def post(app, body, path="/v1/completions"):
    return run(post_all(app, [body], path))[0]


def get(app, path):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path)
    return run(go())


def test_models_health_metrics(app):
    models = get(app, "/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids[:2] == ["auto", "base"] and set(ids[2:]) == set(TASKS)
    assert {m["id"]: m["domain"] for m in models["data"]}["beta"] == "translation"
    health = get(app, "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["adapters"] == 3
    post(app, {"prompt": "the movie was great", "max_tokens": 2})
    text = get(app, "/metrics").text
    for name in ("lora_retriever_requests_total", "lora_retriever_errors_total", "lora_retriever_queue_depth",
                 "lora_retriever_batch_size_bucket", "lora_retriever_generation_tokens_total",
                 "lora_retriever_request_latency_seconds_bucket", "lora_retriever_time_to_first_token_seconds_bucket"):
        assert name in text


def test_completion_schema_and_retrieval(app):
    r = post(app, {"model": "auto", "prompt": "the actors were wonderful", "max_tokens": 5, "lora_num": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "auto"
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 5 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert [a["name"] for a in body["adapters"]][0] == "alpha"  # the sentiment adapter is nearest to a sentiment input
    assert len(body["adapters"]) == 2 and body["composition"] == "mixture"
    assert all(a["weight"] == pytest.approx(0.5) and a["similarity"] is not None for a in body["adapters"])
    assert set(body["timings"]) >= {"retrieval_ms", "ttft_ms", "total_ms", "tokens_per_s"}


def test_chat_and_named_adapters(app):
    r = post(app, {"model": "beta", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                   "max_tokens": 3}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["adapters"] == [{"name": "beta", "domain": "translation", "similarity": None, "weight": 1.0}]
    assert body["composition"] == "selection"
    r = post(app, {"prompt": "x y", "adapters": {"alpha": 0.7, "gamma": 0.8}, "composition": "fusion", "max_tokens": 2})
    body = r.json()
    assert [(a["name"], a["weight"]) for a in body["adapters"]] == [("alpha", 0.7), ("gamma", 0.8)]  # weights as given
    assert body["composition"] == "fusion"
    assert post(app, {"model": "base", "prompt": "x", "max_tokens": 2}).json()["adapters"] == []


def test_streaming_matches_non_streaming(app):
    req = {"prompt": "question: who is the cat?", "max_tokens": 6, "adapters": {"gamma": 1.0}}
    full = post(app, req).json()
    r = post(app, dict(req, stream=True, stream_options={"include_usage": True}))
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["adapters"][0]["name"] == "gamma"
    # one chunk per generated token, the first one included (clients time the first chunk as the first token), and
    # the finishing chunk
    assert len([c for c in chunks if c["choices"]]) == full["usage"]["completion_tokens"] + 1
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == full["choices"][0]["finish_reason"]


def test_stop_sequences_cut_the_text(app):
    full = post(app, {"prompt": "the movie", "max_tokens": 8, "model": "alpha"}).json()["choices"][0]["text"]
    assert len(full) > 2
    stop = full[1:3]
    cut = post(app, {"prompt": "the movie", "max_tokens": 8, "model": "alpha", "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    streamed = post(app, {"prompt": "the movie", "max_tokens": 8, "model": "alpha", "stop": stop, "stream": True}).text
    parts = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(p["choices"][0]["text"] for p in parts) == cut["text"]  # no part of the stop string leaks out


MIXES = [
    {"model": "auto", "prompt": "the movie was great and wonderful", "max_tokens": 12},
    {"model": "base", "prompt": "translate to french: the book", "max_tokens": 7},
    {"model": "gamma", "prompt": "question: who sits on the mat?", "max_tokens": 10},
    {"prompt": "the cat sits", "adapters": {"alpha": 0.3, "beta": 0.9}, "composition": "fusion", "max_tokens": 9},
    {"prompt": "a great film", "lora_num": 2, "weighting": "softmax", "max_tokens": 12},
    {"prompt": "who wrote the book", "adapters": {"beta": 1.5, "gamma": -0.5, "alpha": 0.2}, "max_tokens": 5},
]


def test_batched_equals_alone(app, engine):
    alone = [post(app, body).json() for body in MIXES]
    sched = engine.scheduler
    sched.max_rows_seen = 0
    together = run(post_all(app, MIXES))
    assert sched.max_rows_seen >= 4  # they really ran as one batch
    for a, t in zip(alone, together):
        assert t.status_code == 200
        assert t.json()["choices"][0]["text"] == a["choices"][0]["text"]
        assert t.json()["usage"] == a["usage"]
        # batched retrieval embeds the queries in one padded batch: similarities agree to float rounding
        assert [x["name"] for x in t.json()["adapters"]] == [x["name"] for x in a["adapters"]]
        assert [x["weight"] for x in t.json()["adapters"]] == pytest.approx([x["weight"] for x in a["adapters"]], abs=1e-5)
    # Joining a running batch between steps: a long request first, the others arrive while it decodes.
    long_req = {"prompt": "the actors were wonderful", "max_tokens": 40, "stop": ["\x00never"]}
    alone_long = post(app, long_req).json()
    sched.max_rows_seen = sched.steps_with_joins = 0
    staggered = run(post_staggered(app, sched, long_req, MIXES))
    assert sched.max_rows_seen >= 2
    assert sched.steps_with_joins >= 1  # they were prefilled inside the running row's decoding steps (mixed steps)
    assert staggered[0].json()["choices"][0]["text"] == alone_long["choices"][0]["text"]
    for a, t in zip(alone, staggered[1:]):
        assert t.json()["choices"][0]["text"] == a["choices"][0]["text"]
    # The same with prompts prefilled in chunks of 3 tokens (--max_prefill_tokens 3), over several steps each.
    sched.decoder.max_prefill_tokens = 3
    try:
        chunked = run(post_staggered(app, sched, long_req, MIXES))
    finally:
        sched.decoder.max_prefill_tokens = None
    assert [c.json()["choices"][0]["text"] for c in chunked] == [t.json()["choices"][0]["text"] for t in staggered]
    assert [c.json()["usage"] for c in chunked] == [t.json()["usage"] for t in staggered]


@pytest.fixture(scope="module")
def ahead_engine(tiny_base, tiny_loras, tmp_path_factory):
    from tests.helpers import tiny_engine

    eng = tiny_engine(tiny_base, tiny_loras, tmp_path_factory.mktemp("serve_pool_ahead"), "--embed_ahead", "on", "--prefill", "separate")
    eng.scheduler.start()
    yield eng
    eng.scheduler.stop()


def recorded_embedding_threads(engine, monkeypatch, fail_on: str | None = None) -> list[str]:
    """The names of the threads that call the engine's sentence embedder from now on (``fail_on``: that thread's
    calls raise)."""
    import threading

    embedder = engine.scheduler.router.embedder
    real, threads = embedder.encode, []

    def recording(texts, *a, **k):
        threads.append(threading.current_thread().name)
        if threads[-1] == fail_on:
            raise RuntimeError("embedder busy")
        return real(texts, *a, **k)

    monkeypatch.setattr(embedder, "encode", recording)
    return threads


def test_queries_are_embedded_on_the_decoding_thread_on_cpu(app, engine, monkeypatch):
    """A model decoding on the CPU embeds the queries on the scheduler's thread (``--embed_ahead auto``): a thread of
    their own would share the cores with the step."""
    assert not engine.scheduler.q.embed_ahead
    threads = recorded_embedding_threads(engine, monkeypatch)
    run(post_all(app, MIXES))
    assert threads and set(threads) == {"lora-scheduler"}


def test_queries_are_embedded_ahead_off_the_decoding_thread(app, ahead_engine, monkeypatch):
    """With ``--embed_ahead on``, retrieval's embeddings are computed on the queue's embedding thread, never on the
    scheduler's (which decodes); the answers are those of the other server's requests sent alone. An embedding that
    fails ahead is computed again when routed."""
    from utils.serving.http_api import create_app

    ahead = create_app(ahead_engine, max_body_bytes=4096)
    alone = [post(app, body).json() for body in MIXES]
    threads = recorded_embedding_threads(ahead_engine, monkeypatch)
    together = run(post_all(ahead, MIXES))
    assert threads and set(threads) == {"lora-embedder"}
    for a, t in zip(alone, together):
        assert t.json()["choices"][0]["text"] == a["choices"][0]["text"]
        assert [x["name"] for x in t.json()["adapters"]] == [x["name"] for x in a["adapters"]]
    assert together[0].json()["timings"]["retrieval_ms"] > 0  # "auto": the embedding's time and the search's

    threads = recorded_embedding_threads(ahead_engine, monkeypatch, fail_on="lora-embedder")
    again = post(ahead, MIXES[0]).json()
    assert threads == ["lora-embedder", "lora-scheduler"]
    assert again["choices"][0]["text"] == alone[0]["choices"][0]["text"]
    assert [x["name"] for x in again["adapters"]] == [x["name"] for x in alone[0]["adapters"]]


def test_server_decoding_matches_generate(app, engine, tiny_base, tiny_loras):
    """The server's own decoding loop gives the tokens of transformers' greedy ``generate`` under :func:`compose`
    (on a pool of its own: the server's model carries the server's hooks while it runs)."""
    from transformers import AutoModelForCausalLM

    from utils.adapter_pool import AdapterPool
    from utils.composition import compose
    from utils.data import PoolEntry

    pool = AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_base).eval(),
                       [PoolEntry(n, "d", ["x"], str(p)) for n, p in tiny_loras.items()], show_progress=False)
    prompt_ids = engine.completion_prompt("question: who is the cat?", "template")[0]
    ids = torch.tensor([prompt_ids])
    eos = engine.scheduler.decoder.eos_ids
    for body, idx, w, mode in (({"adapters": {"beta": 0.4, "gamma": 0.6}}, [1, 2], [0.4, 0.6], "mixture"),
                               ({"adapters": {"alpha": 0.5, "gamma": 0.9}, "composition": "fusion"}, [0, 2], [0.5, 0.9], "fusion")):
        with compose(pool, torch.tensor([idx]), torch.tensor([w]), mode) as m:
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=None)
        new = out[0, len(prompt_ids):].tolist()
        if any(t in eos for t in new):
            new = new[: min(new.index(t) for t in eos if t in new)]
        expected = engine.tokenizer.decode(new, skip_special_tokens=True)
        got = post(app, dict(body, prompt="question: who is the cat?", max_tokens=8)).json()["choices"][0]["text"]
        assert got == expected
    out = pool.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=None)
    new = out[0, len(prompt_ids):].tolist()
    if any(t in eos for t in new):
        new = new[: min(new.index(t) for t in eos if t in new)]
    got = post(app, {"model": "base", "prompt": "question: who is the cat?", "max_tokens": 8}).json()["choices"][0]["text"]
    assert got == engine.tokenizer.decode(new, skip_special_tokens=True)


ERRORS = [
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "Unknown model"),
    ({"prompt": "x", "adapters": {"nope": 1.0}}, 400, "adapters", "not in the pool"),
    ({"prompt": "x", "composition": "average"}, 400, "composition", "composition"),
    ({"prompt": "x", "weighting": "max"}, 400, "weighting", "weighting"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens", "between 1 and 64"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "between 1 and 64"),
    ({"prompt": "x " * 3000}, 413, None, "over the limit"),
    ({"prompt": "the " * 400, "max_tokens": 60}, 400, "prompt", "context"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [[1, 2], [10**9]]}, 400, "prompt", "token ids between 0 and"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs", "needs 'logprobs': true"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias", "not supported"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ({"prompt": "x", "n": 100, "temperature": 1}, 400, "n", "between 1 and 64"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "0 is allowed with echo"),
    ({"messages": []}, 400, "messages", "empty"),
    ({"prompt": "x", "adapters": {"alpha": "heavy"}}, 400, "adapters.alpha", "valid number"),
    ({"prompt": "x", "lora_num": 0}, 400, "lora_num", "between 1 and 3"),
    ({"prompt": "x", "lora_num": 3, "exclude": ["alpha"]}, 400, "lora_num", "between 1 and 2"),
    ({"prompt": "x", "exclude": ["zeta"]}, 400, "exclude", "not in the pool"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "between 0 and 2"),
    ({"prompt": "x", "n": 3}, 400, "n", "identical choices"),
    ({"max_tokens": 3}, 400, "prompt", "lacks the required field"),
    ({"model": "base", "prompt": "x", "adapters": {"alpha": 1}}, 400, "adapters", "model 'auto'"),
    ([1, 2], 400, None, "JSON object"),
]


@pytest.mark.parametrize("body,status,param,words", ERRORS, ids=[f"{i}-{e[1]}" for i, e in enumerate(ERRORS)])
def test_invalid_requests_get_openai_errors(app, body, status, param, words):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    r = post(app, body, path)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"]
    if param is not None:
        assert err["param"] == param
    # and the server goes on serving everyone else
    assert post(app, {"prompt": "the movie was great", "max_tokens": 2}).status_code == 200


def test_api_key_required_when_set(engine):
    from utils.serving.http_api import create_app

    app = create_app(engine, api_key="s3cret")
    assert post(app, {"prompt": "x", "max_tokens": 1}).status_code == 401
    assert get(app, "/v1/models").status_code == 401

    async def with_key():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"})
    assert run(with_key()).status_code == 200


def test_full_queue_answers_429(engine):
    """A scheduler that is not consuming, with room for one request: the second gets 429 and Retry-After."""
    import dataclasses

    from utils.serving.http_api import create_app
    from utils.serving.request_scheduler import Scheduler

    stalled = Scheduler(engine.scheduler.decoder, pool=engine.pool, router=engine.scheduler.router, max_queue=1)
    app = create_app(dataclasses.replace(engine, scheduler=stalled))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            first = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}))
            await until(lambda: stalled.stats()["waiting"] == 1)  # the first request holds the queue's one place
            second = await client.post("/v1/completions", json={"prompt": "y", "max_tokens": 1})
            first.cancel()
            return second
    r = run(go())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_failure_in_a_batch_fails_only_that_batch(app, engine):
    decoder = engine.scheduler.decoder
    original = decoder._forward
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("simulated device error")

    decoder._forward = failing
    try:
        r = post(app, {"prompt": "the movie", "max_tokens": 3})
    finally:
        decoder._forward = original
    assert calls["n"] == 1
    assert r.status_code == 500 and "simulated device error" in r.json()["error"]["message"]
    assert not decoder.composition._rows  # nothing kept for the failed rows
    ok = post(app, {"prompt": "the movie", "max_tokens": 3})
    assert ok.status_code == 200 and engine.scheduler.alive


def test_web_page_is_served_from_the_projects_web_folder(app):
    """GET / answers web/index.html itself (the page's own path, wherever the API module lives)."""
    from pathlib import Path

    r = get(app, "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert r.text == (Path(__file__).resolve().parent.parent / "web" / "index.html").read_text(encoding="utf-8")
