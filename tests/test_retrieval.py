"""Retrieval: distinct top-k, OOD exclusion, batched vs single queries, retrieval accuracy."""

import numpy as np
import pytest

from tests.helpers import FakeEmbedder
from utils.retrieval import LoraRetriever, build_index, composition_weights

POOL = {
    "sentiment": ["the movie was great", "awful acting and a boring plot", "i loved this film"],
    "translation": ["translate to french the cat", "translate into german the house", "translate this sentence"],
    "qa": ["who wrote the book", "what is the capital of france", "when did the war end"],
    "math": ["what is two plus two", "compute the sum of numbers", "multiply three by four"],
    "nli": ["premise hypothesis entailment", "does the premise entail the hypothesis", "premise and hypothesis contradict"],
}
QUERIES = ["the film was great and i loved it", "translate to german the cat", "who wrote the war book", "compute two plus four"]
TASKS = ["sentiment", "translation", "qa", "math"]


@pytest.fixture()
def retriever():
    return LoraRetriever(FakeEmbedder(), list(POOL), list(POOL.values()))


def test_top_k_distinct_and_sorted(retriever):
    names, scores = retriever.search(QUERIES, 3)
    for row, s in zip(names, scores):
        assert len(row) == 3 and len(set(row)) == 3
        assert list(s) == sorted(s, reverse=True)
    assert [row[0] for row in names] == TASKS  # the fake embedder makes the own task the nearest


def test_ood_excludes_own_task_and_still_returns_k(retriever):
    names, _ = retriever.search(QUERIES, 4, exclude=TASKS)
    for row, own in zip(names, TASKS):
        assert own not in row and len(row) == 4 and len(set(row)) == 4
    with pytest.raises(ValueError, match="own task excluded"):
        retriever.search(QUERIES, 5, exclude=TASKS)


def test_batched_equals_single_queries(retriever):
    batched, bs = retriever.search(QUERIES, 2)
    for i, q in enumerate(QUERIES):
        single, ss = retriever.search([q], 2)
        assert single[0] == batched[i]
        np.testing.assert_allclose(ss[0], bs[i], rtol=1e-6)
    assert retriever.embedder.calls == 1 + 1 + len(QUERIES)  # pool samples once, the batch once, then each single


def test_pool_vectors_are_normalised_means(retriever):
    emb = FakeEmbedder().encode(POOL["qa"])
    mean = emb.mean(0)
    np.testing.assert_allclose(retriever.vectors[2], mean / np.linalg.norm(mean), rtol=1e-5)


def test_hnsw_index_agrees_with_flat():
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((500, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = vecs[:20] + 0.01
    _, flat = build_index(vecs, "flat").search(q, 1)
    _, hnsw = build_index(vecs, "hnsw").search(q, 1)
    assert (flat[:, 0] == hnsw[:, 0]).mean() >= 0.95


def test_weights():
    s = np.array([[0.9, 0.5, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(composition_weights(s), [[1 / 3] * 3])
    w = composition_weights(s, "softmax", 0.1)
    assert w.sum() == pytest.approx(1.0) and w[0, 0] > w[0, 1] > w[0, 2]


def test_retrieval_accuracy(retriever):
    from evaluate_retrieval import retrieval_accuracy

    rows = [{"inputs": q, "task": t, "domain": t + "_dom"} for q, t in zip(QUERIES, TASKS)]
    acc = retrieval_accuracy(retriever, rows, {n: n + "_dom" for n in POOL}, [1, 3])
    assert acc["overall"]["task@1"] == 100.0 and acc["overall"]["n"] == 4
    assert acc["overall"]["ood-domain@1"] == 0.0  # each domain has one adapter, which OOD removes
    assert list(acc)[:2] == ["task: sentiment", "task: translation"]


def test_embedding_cache_reuses_and_keys_on_text(tmp_path, monkeypatch):
    from utils.retrieval import Embedder

    emb = Embedder("embedded:all-minilm-l6-v2", cache_dir=tmp_path)
    first = emb.encode(["the cat sat", "a dog"])
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def boom(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(emb, "_encode", boom)
    np.testing.assert_array_equal(emb.encode(["the cat sat", "a dog"]), first)
    with pytest.raises(AssertionError, match="cache was not used"):
        emb.encode(["the cat sat", "another text"])
    other = Embedder("embedded:all-minilm-l6-v2", instruction="", cache_dir=tmp_path)
    assert not np.allclose(other.encode(["the cat sat", "a dog"]), first)  # another instruction, another entry


class TableEmbedder:
    """Fixed, already normalised 2-d embeddings per text."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts, show_progress=False):
        return np.asarray([self.table[t] for t in texts], dtype=np.float32)


def test_adapter_vector_mean_and_normalized_mean_rank_as_their_formulas_say():
    """Adapter 'spread' has samples at +-45 degrees around the query's direction (mean (0.707, 0)); adapter 'tight'
    has both samples at 30 degrees (mean (0.866, 0.5), norm 1). Cosine prefers 'spread'; the plain mean prefers 'tight'."""
    from utils.retrieval import LoraRetriever

    c45, c30, s30 = np.cos(np.pi / 4), np.cos(np.pi / 6), np.sin(np.pi / 6)
    table = {"s1": (c45, c45), "s2": (c45, -c45), "t1": (c30, s30), "t2": (c30, s30), "q": (1.0, 0.0)}
    emb = TableEmbedder(table)
    by_cos = LoraRetriever(emb, ["spread", "tight"], [["s1", "s2"], ["t1", "t2"]], adapter_vector="normalized_mean")
    by_mean = LoraRetriever(emb, ["spread", "tight"], [["s1", "s2"], ["t1", "t2"]], adapter_vector="mean")
    names, scores = by_cos.search(["q"], 2)
    assert names == [["spread", "tight"]]
    np.testing.assert_allclose(scores[0], [1.0, c30], atol=1e-6)
    names, scores = by_mean.search(["q"], 2)
    assert names == [["tight", "spread"]]
    np.testing.assert_allclose(scores[0], [c30, c45], atol=1e-6)
    with pytest.raises(ValueError, match="adapter vector"):
        LoraRetriever(emb, ["spread"], [["s1"]], adapter_vector="median")


def test_paper_profiles_use_the_plain_mean_and_the_embedded_one_the_normalised_mean():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("paper_llama2_7b", "paper_llama2_13b"):
        assert json.loads((root / "config" / f"{name}.json").read_text())["adapter_vector"] == "mean"
    assert json.loads((root / "config" / "embedded.json").read_text())["adapter_vector"] == "normalized_mean"


def test_retrieval_benchmark_files_are_at_the_papers_scale_and_disjoint_from_training():
    """The committed output of data/build_retrieval_benchmark.py: 48+ tasks in 8+ domains, 20 samples and up to 50
    test rows each, in the paper's formats; a training set of 60+ tasks sharing no BIG-bench task with it or with
    the embedded pool."""
    import importlib.util
    import json
    from pathlib import Path

    from utils.data import load_pool_config, load_rows

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("build_retrieval_benchmark", root / "data" / "build_retrieval_benchmark.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    builder.check_disjoint()
    bench_dir, train_dir = root / "data" / "retrieval_benchmark", root / "data" / "retrieval_train"
    pool = load_pool_config(bench_dir / "pool.json", check_paths=False, adapter_pattern="{name}")
    rows = load_rows(bench_dir / "combined_test.json")
    assert len(pool) >= 48 and len({e.domain for e in pool}) >= 8
    assert all(len(e.samples) == 20 for e in pool)
    per_task = {}
    for r in rows:
        per_task[r["task"]] = per_task.get(r["task"], 0) + 1
    assert set(per_task) == {e.name for e in pool} and max(per_task.values()) <= 50
    by_domain = {}
    for e in pool:
        by_domain.setdefault(e.domain, []).append(e.name)
    assert all(len(v) >= 3 for v in by_domain.values())  # neighbours compete in every domain
    train_pool = load_pool_config(train_dir / "pool.json", check_paths=False, adapter_pattern="{name}")
    assert len(train_pool) >= 60
    bench_sources = {t["source"] for t in json.loads((bench_dir / "suite.json").read_text())["tasks"]}
    train_sources = {t["source"] for t in json.loads((train_dir / "suite.json").read_text())["tasks"]}
    embedded_sources = {t["source"] for t in json.loads((root / "data" / "bigbench" / "suite.json").read_text())["tasks"]}
    assert not bench_sources & train_sources and not train_sources & embedded_sources
    # test inputs never appear among the samples or training inputs
    samples = {s for e in pool for s in e.samples}
    assert not samples & {r["inputs"] for r in rows}
