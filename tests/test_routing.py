"""The router: every routing method for a batch of inputs at once, with a deterministic embedder."""

import numpy as np
import pytest

from tests.helpers import FakeEmbedder
from utils.data import InputError
from utils.retrieval import LoraRetriever, composition_weights
from utils.routing import Route, Router

POOL = {
    "sentiment": ("reviews", ["the movie was great", "a wonderful film", "the actors were bad"]),
    "translate": ("language", ["translate to french the cat", "translate to french the book"]),
    "qa": ("knowledge", ["who wrote the book", "who is the president", "what is the capital"]),
    "grammar": ("language", ["fix the grammar of this sentence", "correct the spelling here"]),
}


@pytest.fixture()
def router():
    embedder = FakeEmbedder()
    retriever = LoraRetriever(embedder, list(POOL), [s for _, s in POOL.values()])
    return Router(list(POOL), [d for d, _ in POOL.values()], retriever)


def test_auto_is_the_retrievers_top_k_with_its_weights(router):
    queries = ["the film was great", "who wrote the book", "translate to french the mat"]
    names, scores = router.retriever.search(queries, 2, exclude=[(), ("qa",), ()])
    routing = router.route(queries, [Route("auto", k=2, exclude=()), Route("auto", k=2, exclude=("qa",)),
                                     Route("auto", k=2, weighting="softmax", temperature=0.1, mode="fusion")])
    assert routing.adapters == names
    assert routing.similarities == [[float(s) for s in row] for row in scores]
    assert routing.weights[0] == [0.5, 0.5] and "qa" not in routing.adapters[1]
    assert routing.weights[2] == pytest.approx(composition_weights(scores[2:], "softmax", 0.1)[0].tolist())
    assert routing.modes == ["mixture", "mixture", "fusion"]
    assert routing.label(2) == "fusion" and routing.meta["retrieval_s"] >= 0


def test_every_input_is_embedded_in_one_call(router):
    calls = router.retriever.embedder.calls
    router.route(["a", "b", "c", "d"], [Route("auto", k=1), Route("soup"), Route("base"), Route("auto", k=3)])
    assert router.retriever.embedder.calls == calls + 1


def test_mix_base_own_and_soup_all(router):
    routing = router.route(["x", "y", "z", "w"], [Route("mix", mix=(("qa", 0.7), ("grammar", -0.2)), mode="fusion"),
                                                  Route("base"), Route("own", task="translate"),
                                                  Route("soup_all", exclude=("qa",))])
    assert routing.adapters == [["qa", "grammar"], [], ["translate"], ["sentiment", "translate", "grammar"]]
    assert routing.weights[:3] == [[0.7, -0.2], [], [1.0]] and routing.weights[3] == pytest.approx([1 / 3] * 3)
    assert routing.similarities == [None] * 4
    assert [routing.label(i) for i in range(4)] == ["fusion", "base", "selection", "fusion"]
    assert routing.applied(0, {"qa": "knowledge"}) == [{"name": "qa", "domain": "knowledge", "similarity": None, "weight": 0.7},
                                                       {"name": "grammar", "domain": "", "similarity": None, "weight": -0.2}]


def test_soup_takes_the_nearest_domain_without_the_excluded_adapter(router):
    routing = router.route(["translate to french the dog", "translate to french the dog"],
                           [Route("soup"), Route("soup", exclude=("translate",))])
    assert routing.adapters[0] == ["translate", "grammar"] and routing.extra[0] == {"soup_domain": "language"}
    assert "translate" not in routing.adapters[1]
    assert routing.modes == ["fusion", "fusion"] and routing.weights[0] == [0.5, 0.5]


def test_retrieval_without_a_retriever_is_refused():
    with pytest.raises(InputError, match="no retriever"):
        Router(["a"]).route(["x"], [Route("auto", k=1)])
    assert Router(["a"]).route(["x"], [Route("mix", mix=(("a", 1.0),))]).adapters == [["a"]]


def test_unknown_method_and_mismatched_lengths_are_refused(router):
    with pytest.raises(ValueError, match="Unknown routing method"):
        router.route(["x"], [Route("nearest")])
    with pytest.raises(ValueError, match="2 queries but 1 routes"):
        router.route(["x", "y"], [Route("base")])
    assert np.isfinite(router.retriever.vectors).all()
