"""Stage: the task library, and routing through tasks (LoRAuter).

LoraRetriever represents each adapter by its card (its training task's inputs), so an adapter without a card can
never be retrieved. LoRAuter (Dhasade et al., arXiv 2601.21795) routes through *tasks* instead:

- a **task** is a small labelled validation set ``{inputs, targets}`` with a metric, held in a task library that is
  separate from the adapters (by default each pool entry's card is one task, named after the entry; ``--task_library
  FILE`` adds more);
- every adapter is scored on every task (:mod:`utils.task_scores`: the task x adapter score matrix), so each task has
  a ranking of adapters, best first;
- a task is embedded as the L2-normalised plain mean of its inputs' embeddings (the retriever's embedder and
  instruction): u_t = normalize(mean_i e(x_ti)), U: [T, d].

A query q with embedding e(q) (normalised) is routed (:func:`route_through_tasks`):

    s_t  = <e(q), u_t>                                  cosine similarity to every task
    K    = the top K tasks by s_t (K = 3)
    w_t  = exp(s_t / tau) / sum_{t' in K} exp(s_t' / tau)   (tau = 0.2)
    a(t) = the best adapter of task t (the first of its ranking)
    W_a  = sum_{t in K, a(t) = a} w_t                  weights add up where two tasks share their best adapter

and the adapters with weights W_a are composed by the paper's mixture. Out of domain (``exclude``: the query's own
task), the task is removed from the library and the adapter of the same name is masked out of every ranking, so
a(t) is then the best *other* adapter of task t.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.data import InputError

METRICS = ("em", "bleu", "rouge")


@dataclass
class Task:
    """One task of the library: a name, its domain and metric, and its labelled validation rows."""

    name: str
    domain: str
    metric: str
    inputs: list[str]
    targets: list[str]
    source: str = "pool"  # "pool" (an entry's card) or the task library file it came from

    @property
    def digest(self) -> str:
        """What a score of this task depends on: its metric and rows (not its name)."""
        return hashlib.sha256(json.dumps([self.metric, self.inputs, self.targets]).encode()).hexdigest()[:24]

    def row_digest(self, j: int, with_target: bool = True) -> str:
        """What one row's score depends on: its input, and its target where the scorer reads it (a log-likelihood
        does; a greedy answer does not). Rows shared by two tasks, or kept when a task changes, share their scores."""
        return hashlib.sha256(json.dumps([self.inputs[j], self.targets[j] if with_target else None]).encode()).hexdigest()[:24]


def tasks_from_pool(entries) -> list[Task]:
    """One task per pool entry whose card has targets (each sample with a string ``targets``), named after the
    entry, with its ``metric`` (``em`` where the entry gives none)."""
    out = []
    for e in entries:
        rows = [(x, y) for x, y in zip(e.samples, e.sample_targets or []) if isinstance(y, str)]
        if not rows:
            continue
        metric = str(e.extra.get("metric", "em")).lower()
        out.append(Task(e.name, e.domain, metric if metric in METRICS else "em", [x for x, _ in rows], [y for _, y in rows]))
    return out


def load_task_library(path: str | Path) -> list[Task]:
    """Tasks from a JSON file: a list of ``{"name", "domain", "metric", "rows": [{"inputs", "targets"}, ...]}`` (the
    pool config's spelling, ``model_name`` and ``sample``, is read too)."""
    from utils.data import _read_json_or_jsonl

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--task_library {path} does not exist; give a JSON list of tasks (docs/lorauter.md).")
    items = _read_json_or_jsonl(path, "Task library")
    if not isinstance(items, list) or not items:
        raise InputError(f"Task library {path} must be a non-empty JSON list of tasks.")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"Task library {path}, task {i}"
        if not isinstance(item, dict):
            raise InputError(f"{where} is a {type(item).__name__}, not an object.")
        name = item.get("name", item.get("model_name"))
        if not isinstance(name, str) or not name:
            raise InputError(f"{where} lacks a string 'name'.")
        if name in seen:
            raise InputError(f"{where}: duplicate task name {name!r}.")
        seen.add(name)
        metric = str(item.get("metric", "em")).lower()
        if metric not in METRICS:
            raise InputError(f"{where} ({name!r}): unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
        rows = item.get("rows", item.get("sample"))
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and isinstance(r.get("inputs"), str)
                                                             and isinstance(r.get("targets"), str) for r in rows):
            raise InputError(f"{where} ({name!r}) needs 'rows': a non-empty list of objects with string 'inputs' and 'targets'.")
        out.append(Task(name, str(item.get("domain", "")), metric, [r["inputs"] for r in rows], [r["targets"] for r in rows], str(path)))
    return out


def task_library(entries, path: str | Path | None = None) -> list[Task]:
    """The pool's tasks (:func:`tasks_from_pool`) and those of ``path``; a name in both is refused."""
    tasks = tasks_from_pool(entries)
    if path:
        taken = {t.name for t in tasks}
        extra = load_task_library(path)
        clash = [t.name for t in extra if t.name in taken]
        if clash:
            raise InputError(f"Task library {path}: {clash[:3]} are already tasks of the pool (its entries' cards); rename them.")
        tasks += extra
    return tasks


def mean_embeddings(embedder, groups: list[list[str]]) -> np.ndarray:
    """The plain mean embedding [len(groups), d] of each group of texts (cached per group where the embedder can)."""
    if hasattr(embedder, "card_means"):
        return embedder.card_means(groups)
    flat = [x for g in groups for x in g]
    emb, out, start = embedder.encode(flat), [], 0
    for g in groups:
        out.append(emb[start:start + len(g)].mean(0))
        start += len(g)
    return np.stack(out).astype(np.float32)


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = (np.asarray(x, dtype=np.float64) / temperature)
    z = np.exp(z - z.max())
    return z / z.sum()


def route_through_tasks(sims: np.ndarray, task_names: list[str], rankings: dict[str, list[str]], k: int = 3,
                        temperature: float = 0.2, exclude=frozenset()) -> tuple[list[str], list[float], dict]:
    """One query's adapters and weights through its nearest tasks (module docstring).

    Args:
        sims: [T] cosine similarity of the query to each task of ``task_names``.
        rankings: each task's adapters, best first (tasks without one, or whose adapters are all excluded, are skipped).
        exclude: names removed as tasks and masked as adapters (OOD: the query's own task).
    Returns:
        (adapters, weights, extra): adapters in order of weight (largest first, ties by first use), weights summing
        to 1, and ``{"tasks": [...], "task_scores": [...], "task_adapters": [...]}`` of the K tasks used.
    """
    if temperature <= 0:
        raise ValueError(f"LoRAuter's temperature must be positive (got {temperature}).")
    ban = frozenset(exclude)
    usable = []
    for t, name in enumerate(task_names):
        if name in ban:
            continue
        best = next((a for a in rankings.get(name, ()) if a not in ban), None)
        if best is not None:
            usable.append((t, best))
    if not usable:
        raise ValueError("No task of the library has a scored adapter to route to" + (" once the own task is excluded." if ban else "."))
    order = sorted(usable, key=lambda tb: (-float(sims[tb[0]]), tb[0]))[:k]
    top = np.array([float(sims[t]) for t, _ in order])
    w = softmax(top, temperature)
    summed: dict[str, float] = {}
    for (_, a), wt in zip(order, w):
        summed[a] = summed.get(a, 0.0) + float(wt)
    adapters = sorted(summed, key=lambda a: -summed[a])  # stable: ties keep the order of first use
    extra = {"tasks": [task_names[t] for t, _ in order], "task_scores": [float(s) for s in top],
             "task_adapters": [a for _, a in order]}
    return adapters, [summed[a] for a in adapters], extra


@dataclass
class TaskIndex:
    """The task library as routing reads it: task names, their unit vectors U [T, d], and each task's adapter
    ranking (best first, from the score matrix), which changes as adapters are scored."""

    names: list[str]
    vectors: np.ndarray
    rankings: dict[str, list[str]] = field(default_factory=dict)
    embedder: object = None
    tasks: list[Task] = field(default_factory=list)
    matrix: object = None  # the utils.task_scores.ScoreMatrix the rankings come from (None: rankings given as they are)
    scorer: object = None  # the utils.task_scores.TaskScorer that scored it (scores adapters that join later)

    @classmethod
    def build(cls, embedder, tasks: list[Task], rankings: dict[str, list[str]] | None = None) -> "TaskIndex":
        means = mean_embeddings(embedder, [t.inputs for t in tasks]) if tasks else np.zeros((0, 1), dtype=np.float32)
        norms = np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        return cls([t.name for t in tasks], np.ascontiguousarray(means / norms, dtype=np.float32), dict(rankings or {}),
                   embedder, list(tasks))

    def set_rankings(self, rankings: dict[str, list[str]]) -> None:
        """Each task's adapters, best first (a new dict: a routing call in flight keeps the one it read)."""
        self.rankings = {t: list(r) for t, r in rankings.items()}

    def drop_adapter(self, name: str) -> None:
        """An adapter left the pool: no task routes to it any more."""
        if self.matrix is not None and name in self.matrix.adapters:
            self.matrix = self.matrix.without_adapter(name)
        self.rankings = {t: [a for a in r if a != name] for t, r in self.rankings.items()}

    def route(self, emb: np.ndarray, k: int, temperature: float, excludes: list) -> list[tuple[list[str], list[float], dict]]:
        """:func:`route_through_tasks` for each query embedding of ``emb`` [n, d] (normalised)."""
        from utils.retrieval import as_ban

        sims = np.asarray(emb, dtype=np.float32) @ self.vectors.T  # [n, T]
        return [route_through_tasks(sims[i], self.names, self.rankings, k, temperature, as_ban(excludes[i]))
                for i in range(len(sims))]
