"""The OpenAI fields standard clients send: logprobs, echo, prompt lists and token ids, n, tokenizer routes, usage in streams."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_server import get, post, post_all, run


@pytest.fixture(scope="module")
def engine(tiny_base, tiny_loras, tmp_path_factory):
    from tests.helpers import tiny_engine

    eng = tiny_engine(tiny_base, tiny_loras, tmp_path_factory.mktemp("fields_pool"))
    eng.scheduler.start()
    yield eng
    eng.scheduler.stop()


@pytest.fixture(scope="module")
def app(engine):
    from utils.serving.http_api import create_app

    return create_app(engine)


@pytest.fixture(scope="module")
def reference(tiny_base, tiny_loras):
    """A pool of its own (the server's base model carries the server's hooks while it runs)."""
    from transformers import AutoModelForCausalLM

    from utils.adapter_pool import AdapterPool
    from utils.data import PoolEntry

    return AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_base).eval(),
                       [PoolEntry(n, "d", ["x"], str(p)) for n, p in tiny_loras.items()], show_progress=False)


def log_softmax_in_process(pool, ids, adapters, mode):
    from utils.composition import compose

    x = torch.tensor([ids])
    with torch.no_grad():
        if adapters:
            names, weights = [a["name"] for a in adapters], [a["weight"] for a in adapters]
            with compose(pool, pool.indices([names]), torch.tensor([weights]), mode) as m:
                logits = m(input_ids=x).logits[0]
        else:
            logits = pool.model(input_ids=x).logits[0]
    return torch.log_softmax(logits.float(), -1)


PROMPTS = [[5, 17, 42, 99, 7, 230, 11], [40, 41, 42, 43], [200, 3, 3, 150, 61, 20, 8, 9, 90]]


def test_echo_prompt_logprobs_equal_the_composed_model_inside_a_busy_batch(app, reference):
    """Prompt-token logprobs from echo = log_softmax of the composed model's logits computed in-process, for every token,
    under mixture, fusion, selection and base, while other requests generate in the same batch."""
    scoring = [
        ({"model": "auto", "lora_num": 2}, "mixture"),
        ({"adapters": {"alpha": 0.6, "gamma": 0.7}, "composition": "fusion"}, "fusion"),
        ({"model": "beta"}, "mixture"),
        ({"model": "base"}, "mixture"),
    ]
    bodies = [dict(extra, prompt=PROMPTS[i % 3], echo=True, logprobs=2, max_tokens=1) for i, (extra, _) in enumerate(scoring)]
    busy = [{"prompt": f"the movie number {i}", "max_tokens": 30, "ignore_eos": True, "model": m}
            for i, m in enumerate(["auto", "alpha", "base", "gamma"])]
    replies = run(post_all(app, busy + bodies))
    for (extra, mode), body, r in zip(scoring, bodies, replies[len(busy):]):
        assert r.status_code == 200, r.text
        out = r.json()
        choice = out["choices"][0]
        lp = choice["logprobs"]
        ids = body["prompt"]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = log_softmax_in_process(reference, ids, out["adapters"], mode)
        for i in range(1, len(ids)):
            assert lp["token_logprobs"][i] == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-4), (extra, i)
            top = lp["top_logprobs"][i]
            best = torch.topk(want[i - 1], 2)
            assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)
        # the generated token: greedy, so it is the most likely one, with the logprob of the last position
        assert lp["token_logprobs"][-1] == pytest.approx(float(want[-1].max()), abs=1e-4)
        assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-6)
        assert choice["text"].startswith(out["choices"][0]["text"][: len(lp["tokens"][0])])
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_prompt_lists_token_ids_and_n_choices(app, engine):
    r = post(app, {"prompt": ["the movie was great", "translate to french: the cat"], "max_tokens": 4, "lora_num": 1})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["adapters"][0]["name"] for c in body["choices"]] == ["alpha", "beta"], "each prompt gets its own retrieval"
    alone = [post(app, {"prompt": p, "max_tokens": 4, "lora_num": 1}).json()["choices"][0]["text"]
             for p in ("the movie was great", "translate to french: the cat")]
    assert [c["text"] for c in body["choices"]] == alone
    ids = engine.encode("question: who is the cat?", special_tokens=False)
    by_ids = post(app, {"prompt": [ids, ids[:3]], "max_tokens": 3, "prompt_format": "raw"}).json()
    as_text = post(app, {"prompt": "question: who is the cat?", "max_tokens": 3, "prompt_format": "raw"}).json()
    assert by_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids) + 3
    sampled = post(app, {"prompt": "the movie", "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 8, "model": "alpha"}).json()
    texts = [c["text"] for c in sampled["choices"]]
    assert len(texts) == 3 and len(set(texts)) > 1, "n choices are sampled independently"
    again = post(app, {"prompt": "the movie", "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 8, "model": "alpha"}).json()
    assert [c["text"] for c in again["choices"]] == texts, "each choice's seed is derived from the request's"
    echo = post(app, {"prompt": [ids], "echo": True, "max_tokens": 0}).json()["choices"][0]
    assert echo["text"] == engine.decode(ids) and echo["logprobs"] is None


def test_chat_logprobs(app):
    r = post(app, {"model": "gamma", "messages": [{"role": "user", "content": "who is the cat?"}], "logprobs": True, "top_logprobs": 3,
                   "max_tokens": 5, "ignore_eos": True}, "/v1/chat/completions")
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) for c in content)  # greedy: the best one
    assert "".join(c["token"] for c in content) == r.json()["choices"][0]["message"]["content"]


def test_streams_carry_one_token_per_chunk_and_usage_in_every_chunk(app):
    body = {"prompt": "the movie", "model": "alpha", "max_tokens": 24, "ignore_eos": True, "stream": True, "logprobs": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    r = post(app, body)
    chunks = [json.loads(l[6:]) for l in r.text.splitlines() if l.startswith("data: {")]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(content) == 24, "one content chunk per generated token"
    assert all(len(c["choices"][0]["logprobs"]["tokens"]) == 1 for c in content)
    assert all("usage" in c for c in chunks)
    assert [c["usage"]["completion_tokens"] for c in content] == list(range(1, 25))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    full = post(app, dict(body, stream=False)).json()
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full["choices"][0]["text"]


def test_tokenizer_routes_and_process_metrics(app, engine):
    tok = post(app, {"prompt": "the cat sits", "add_special_tokens": False}, "/tokenize").json()
    assert tok["tokens"] == engine.encode("the cat sits", special_tokens=False) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == engine.context_length
    assert post(app, {"tokens": tok["tokens"]}, "/detokenize").json()["prompt"] == "the cat sits"
    assert post(app, {"tokens": [-1]}, "/detokenize").status_code == 400
    info = get(app, "/tokenizer_info").json()
    assert info["eos_token"] == engine.tokenizer.eos_token and "chat_template" in info and "model_max_length" in info
    text = get(app, "/metrics").text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info"):
        assert name in text


def test_served_queries_leave_no_files_in_the_embedding_cache(app, engine):
    """Only cards are cached on disk by a server; its queries (lists that never repeat) are not written there."""
    folder = engine.router.retriever.embedder.cache_dir
    before = set(folder.glob("*.npy")) if folder is not None and folder.exists() else set()
    post(app, {"prompt": "a prompt no test has sent before: 7d1e", "max_tokens": 1})
    after = set(folder.glob("*.npy")) if folder is not None and folder.exists() else set()
    assert after == before
