"""Routing through tasks (LoRAuter): the arithmetic against a hand-computed case, the score cache, successive halving
against the full matrix, and main.py's lorauter runs on the tiny model."""

import json
import math

import numpy as np
import pytest

from tests.helpers import write_json
from utils.task_library import Task, TaskIndex, route_through_tasks, tasks_from_pool
from utils.task_scores import ScoreCache, ScoreMatrix, TaskScorer, halving_cost, score_matrix


# --- The routing arithmetic ---------------------------------------------------------------------------------------

def test_route_through_tasks_by_hand():
    """Tasks t1..t4 with similarities 0.9, 0.7, 0.5, 0.1; K = 3, tau = 0.2. t1 and t3 share their best adapter."""
    names = ["t1", "t2", "t3", "t4"]
    sims = np.array([0.9, 0.7, 0.5, 0.1])
    rankings = {"t1": ["a", "b"], "t2": ["b", "a"], "t3": ["a", "c"], "t4": ["d"]}
    adapters, weights, extra = route_through_tasks(sims, names, rankings, k=3, temperature=0.2)
    e = [math.exp(0.9 / 0.2), math.exp(0.7 / 0.2), math.exp(0.5 / 0.2)]
    z = sum(e)
    assert extra["tasks"] == ["t1", "t2", "t3"] and extra["task_adapters"] == ["a", "b", "a"]
    assert adapters == ["a", "b"]
    assert weights == pytest.approx([(e[0] + e[2]) / z, e[1] / z])  # t1 and t3's weights added on adapter a
    assert sum(weights) == pytest.approx(1.0)


def test_ood_removes_the_task_and_masks_its_adapter_everywhere():
    names = ["a", "b", "c"]  # tasks named after their adapters, as the pool's cards are
    sims = np.array([0.95, 0.6, 0.4])
    rankings = {"a": ["a", "c"], "b": ["a", "b"], "c": ["c", "a"]}
    adapters, weights, extra = route_through_tasks(sims, names, rankings, k=2, temperature=0.2, exclude={"a"})
    assert extra["tasks"] == ["b", "c"]  # task a is gone
    assert extra["task_adapters"] == ["b", "c"]  # adapter a is masked out of b's ranking: b's next best
    e = [math.exp(0.6 / 0.2), math.exp(0.4 / 0.2)]
    assert adapters == ["b", "c"] and weights == pytest.approx([e[0] / sum(e), e[1] / sum(e)])


def test_tasks_without_a_usable_adapter_are_skipped_and_k_caps_at_what_is_left():
    sims = np.array([0.9, 0.8])
    adapters, weights, extra = route_through_tasks(sims, ["t1", "t2"], {"t1": ["x"], "t2": []}, k=3, temperature=0.2)
    assert adapters == ["x"] and weights == pytest.approx([1.0]) and extra["tasks"] == ["t1"]
    with pytest.raises(ValueError, match="no scored adapter|No task"):
        route_through_tasks(sims, ["t1", "t2"], {"t1": ["x"]}, k=3, temperature=0.2, exclude={"x"})


def test_task_index_routes_each_query_and_forgets_removed_adapters():
    vectors = np.eye(3, dtype=np.float32)
    index = TaskIndex(["t1", "t2", "t3"], vectors, {"t1": ["a"], "t2": ["b"], "t3": ["c", "a"]})
    q = np.array([[1.0, 0.0, 0.0], [0.0, 0.1, 0.99]], dtype=np.float32)
    first, second = index.route(q, 1, 0.2, [(), ()])
    assert first[0] == ["a"] and second[0] == ["c"]
    index.drop_adapter("c")
    assert index.route(q, 1, 0.2, [(), ()])[1][0] == ["a"]  # t3's next best


# --- Successive halving and the cache ---------------------------------------------------------------------------

class TableScorer:
    """Scores from a fixed table [adapter][row] (mean over the first n rows), counting the (adapter, row) pairs not
    seen before, as TaskScorer's row cache does; the same interface as TaskScorer.scores."""

    scorer = "loglik"

    def __init__(self, table):
        self.table, self.forwards, self.cache, self.seen = table, 0, ScoreCache(None), set()

    def scores(self, task, adapters, rows):
        new = {(a, j) for a in adapters for j in range(rows)} - self.seen
        self.forwards += len(new)
        self.seen |= new
        return [float(np.mean(self.table[a][:rows])) for a in adapters], 0


def test_halving_finds_the_full_matrix_best_when_one_adapter_leads_on_every_prefix():
    rng = np.random.default_rng(0)
    names = [f"a{i}" for i in range(11)]
    table = {n: list(rng.uniform(-3, -2, 16)) for n in names}
    table["a7"] = list(rng.uniform(-1.5, -1, 16))  # the best on every row
    task = Task("t", "", "em", ["x"] * 16, ["y"] * 16)
    full = score_matrix(TableScorer(table), [task], names, halving=False, progress=False)
    halving_scorer = TableScorer(table)
    halved = score_matrix(halving_scorer, [task], names, halving=True, first=2, progress=False)
    assert full.best() == halved.best() == {"t": "a7"}
    assert halving_scorer.forwards == halving_cost(11, 16, 2) < 11 * 16
    assert halved.rows[0, names.index("a7")] == 16  # the survivor reached every row
    assert halved.ranking("t")[0] == "a7" and len(halved.ranking("t")) == 11


def test_narrowing_by_embedding_keeps_the_nearest_cards_and_every_card_less_adapter():
    from tests.helpers import FakeEmbedder
    from utils.data import PoolEntry
    from utils.task_scores import nearest_candidates

    entries = [PoolEntry("cats", "", ["the cat sat", "a cat ran"], "p"), PoolEntry("dogs", "", ["the dog barked", "a dog ran"], "p"),
               PoolEntry("soup", "", ["boil the soup", "stir the soup"], "p"), PoolEntry("mystery", "", [], "p")]
    tasks = [Task("cat_task", "", "em", ["my cat sat", "the cat ran"], ["y", "n"])]
    got = nearest_candidates(FakeEmbedder(), tasks, entries, 1)
    assert got == {"cat_task": ["cats", "mystery"]}
    assert nearest_candidates(FakeEmbedder(), tasks, entries, 0)["cat_task"] == ["cats", "dogs", "soup", "mystery"]
    scorer = TableScorer({"cats": [-1.0] * 4, "dogs": [-0.5] * 4, "soup": [-3.0] * 4, "mystery": [-2.0] * 4})
    m = score_matrix(scorer, [Task("cat_task", "", "em", ["x"] * 4, ["y"] * 4)], ["cats", "dogs", "soup", "mystery"],
                     candidates=got, progress=False)
    assert m.ranking("cat_task") == ["cats", "mystery"] and scorer.forwards == 2 * 2  # two candidates: one rung decides


def test_ranking_orders_by_rung_then_score():
    m = ScoreMatrix(["t"], ["a", "b", "c"], np.array([[-1.0, -2.0, -0.5]]), np.array([[8, 8, 2]]))
    assert m.ranking("t") == ["a", "b", "c"]  # c scored best but was dropped at the first rung


@pytest.fixture(scope="module")
def scorer_parts(tiny_base, tiny_loras):
    from transformers import AutoTokenizer

    from tests.test_composition import make_pool
    from utils.prompter import Prompter

    pool = make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])
    return pool, AutoTokenizer.from_pretrained(tiny_base), Prompter("alpaca")


def test_cache_reuses_unchanged_pairs_scores_new_ones_and_rescores_changed_adapters(scorer_parts, tiny_base, tiny_loras, tmp_path):
    import shutil

    pool, tok, prompter = scorer_parts
    paths = {n: str(tmp_path / n) for n in ("alpha", "beta", "gamma")}
    for n in paths:
        shutil.copytree(tiny_loras[n], paths[n])
    tasks = [Task("t1", "", "em", ["the cat", "a dog", "one two"], ["yes", "no", "yes"]),
             Task("t2", "", "em", ["which answer", "the book"], ["no", "yes"])]
    cache_file = tmp_path / "scores.json"

    first = TaskScorer(pool, tok, prompter, paths, "loglik", ScoreCache(cache_file), batch_size=4)
    m1 = score_matrix(first, tasks, ["alpha", "beta"], halving=False, progress=False)
    assert m1.pairs == 4 and m1.cached == 0 and first.forwards == 2 * 3 + 2 * 2
    assert cache_file.is_file() and not list(tmp_path.glob(".scores.json.*"))  # written atomically

    again = TaskScorer(pool, tok, prompter, paths, "loglik", ScoreCache(cache_file), batch_size=4)
    m2 = score_matrix(again, tasks, ["alpha", "beta", "gamma"], halving=False, progress=False)
    assert m2.cached == 4 and m2.pairs == 2 and again.forwards == 3 + 2  # only gamma's pairs are new
    np.testing.assert_allclose(m2.scores[:, :2], m1.scores)

    # A changed adapter file changes its digest: scored again. A changed task (one more row) too.
    weights = next(p for p in (tmp_path / "beta").iterdir() if p.suffix == ".safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    save_file({k: v * 2 for k, v in tensors.items()}, weights)
    tasks[1] = Task("t2", "", "em", ["which answer", "the book", "more"], ["no", "yes", "no"])
    third = TaskScorer(pool, tok, prompter, paths, "loglik", ScoreCache(cache_file), batch_size=4)
    m3 = score_matrix(third, tasks, ["alpha", "beta", "gamma"], halving=False, progress=False)
    assert m3.pairs == 1 + 3  # beta on t1; every adapter on the changed t2
    assert third.forwards == 3 + (1 + 3 + 1)  # beta everywhere; alpha and gamma only on t2's new row
    assert m3.scores[0, 0] == m2.scores[0, 0]


def test_halving_scores_each_row_once_and_a_rung_reuses_the_rows_before_it(scorer_parts, tiny_loras):
    pool, tok, prompter = scorer_parts
    names = ["alpha", "beta", "gamma"]
    task = Task("t", "", "em", ["the cat", "a dog", "one two", "the book", "which"], ["yes", "no", "yes", "no", "yes"])
    scorer = TaskScorer(pool, tok, prompter, {n: tiny_loras[n] for n in names}, "loglik", batch_size=4)
    halved = score_matrix(scorer, [task], names, halving=True, first=2, progress=False)
    assert scorer.forwards == halving_cost(3, 5, 2) == 3 * 2 + 2 * 2  # rung 2 adds rows 3-4 for the better two
    full, _ = TaskScorer(pool, tok, prompter, {n: tiny_loras[n] for n in names}, "loglik", batch_size=4).scores(task, names, 4)
    survivors = [a for a in range(3) if halved.rows[0, a] == 4]
    np.testing.assert_allclose(halved.scores[0, survivors], np.asarray(full)[survivors], atol=1e-5)


def test_loglik_score_is_the_mean_target_log_likelihood_of_the_composed_model(scorer_parts):
    import torch

    from utils.composition import compose
    from utils.prompter import collate_supervised, encode_supervised

    pool, tok, prompter = scorer_parts
    task = Task("t", "", "em", ["the cat sat", "a"], ["yes please", "no"])
    got, _ = TaskScorer(pool, tok, prompter, {"beta": "beta"}, "loglik", batch_size=2).scores(task, ["beta"], 2)
    want = []
    for x, y in zip(task.inputs, task.targets):
        ids, labels, mask = collate_supervised([encode_supervised(tok, prompter, x, y, 256)], tok.pad_token_id)
        with torch.no_grad(), compose(pool, [["beta"]], torch.tensor([[1.0]])) as model:
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        target = labels[0, 1:]
        want.append(float(lp[target != -100].gather(1, target[target != -100][:, None]).mean()))
    assert got[0] == pytest.approx(float(np.mean(want)), abs=1e-5)


# --- main.py --eval_type lorauter --------------------------------------------------------------------------------

def test_pool_cards_become_tasks():
    from utils.data import PoolEntry

    entries = [PoolEntry("a", "d", ["x", "y"], "p", {"metric": "rouge"}, ["1", None]), PoolEntry("b", "d", ["z"], "q", {}, [None]),
               PoolEntry("c", "d", [], "r")]
    tasks = tasks_from_pool(entries)
    assert [(t.name, t.metric, t.inputs, t.targets) for t in tasks] == [("a", "rouge", ["x"], ["1"])]


def test_lorauter_runs_in_domain_and_ood_with_a_task_library_and_a_card_less_adapter(tmp_path, tiny_base, equal_loras):
    import main as main_mod
    from tests.test_baselines import TASKS, argv, workspace as make_ws  # noqa: F401

    pool = [{"model_name": name, "domain": dom, "metric": "em", "sample": [{"inputs": s, "targets": "positive"} for s in samples],
             "path": str(equal_loras[name])} for name, (dom, samples) in TASKS.items()]
    pool.append({"model_name": "general", "domain": "other", "path": str(equal_loras["general"])})  # no card
    rows = [{"inputs": s + " please", "targets": "positive", "task": name, "domain": dom, "metric": "em"}
            for name, (dom, samples) in TASKS.items() for s in samples[:2]]
    library = write_json(tmp_path / "library.json", [{"name": "extra", "domain": "other", "metric": "em",
                                                      "rows": [{"inputs": "count the words", "targets": "three"}]}])
    ws = {"dir": tmp_path, "pool": write_json(tmp_path / "pool.json", pool), "data": write_json(tmp_path / "data.json", rows),
          "base": str(tiny_base)}
    cache = tmp_path / "scores.json"
    common = ["--eval_type", "lorauter", "--task_library", str(library), "--task_scores", str(cache), "--lorauter_k", "2"]
    assert main_mod.main(argv(ws, *common, res="in.json")) == 0
    assert main_mod.main(argv(ws, *common, "--ood", res="ood.json")) == 0
    res_in, res_ood = (json.loads((tmp_path / f).read_text()) for f in ("in.json", "ood.json"))
    meta = res_in["meta"]["lorauter"]
    assert meta["tasks"] == list(TASKS) + ["extra"] and meta["adapters"] == list(TASKS) + ["general"]
    assert res_ood["meta"]["lorauter"]["pairs"] == 0  # the second run read every score from the cache
    for row in res_in["rows"]:
        assert len(row["tasks"]) == 2 and sum(row["weights"]) == pytest.approx(1.0)
        assert set(row["adapters"]) == set(row["task_adapters"])
    for row in res_ood["rows"]:
        assert row["task"] not in row["tasks"] and row["task"] not in row["adapters"]
    assert res_in["settings"]["lorauter_temperature"] == 0.2 and "task_scores" not in res_in["settings"]
