"""Stage: routing. Which adapters, with which weights and which composition, for each input of a batch.

Every entry asks this stage, and only this stage: main.py's evaluation (a whole test set at once), generate.py (one
prompt) and the server's scheduler (the requests waiting to join the batch). Each input comes with a :class:`Route`,
what it asks for:

    auto      retrieval (:class:`utils.retrieval.LoraRetriever`): the top k adapters for the input's embedding, with
              ``exclude`` (OOD: the row's own task) removed before the top k are taken; weights uniform
              w_j = 1/k (the paper) or softmax w_j = exp(s_j / T) / sum_i exp(s_i / T) over the similarities s
    mix       an explicit weighted mix {adapter: weight}, applied as given (not renormalised); one name is selection
    base      no adapter
    own       perfect selection: the input's own task adapter (``task``), weight 1 (an oracle)
    soup      Adapter Soup: the adapters of the domain nearest to the input (:mod:`utils.baselines.soup`), uniform
              weights, fused
    soup_all  every adapter of the pool but ``exclude``, uniform weights, fused
    lorauter  through tasks (LoRAuter, :mod:`utils.task_library`): the top k tasks of the task library for the input's
              embedding, softmax weights at ``temperature``, each task replaced by its best-scoring adapter; with
              ``exclude`` removed as tasks and masked as adapters (OOD)

LoraHub's learned vectors (:mod:`utils.baselines.lorahub`) reach their rows as ``mix`` routes.

All inputs that need an embedding (auto, soup, lorauter) are embedded in ONE call of the retriever's embedder, in input order;
auto inputs are searched in one FAISS call per (k, weighting, temperature). The answer is one :class:`Routing`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from utils.data import InputError

METHODS = ("auto", "mix", "base", "own", "soup", "soup_all", "lorauter")
EMBEDDED_METHODS = ("auto", "soup", "lorauter")  # the methods that embed the query


@dataclass(frozen=True)
class Route:
    """What one input asks of the router (module docstring). ``mode``: the composition, mixture or fusion."""

    method: str = "auto"
    k: int = 3
    weighting: str = "uniform"
    temperature: float = 1.0
    exclude: tuple[str, ...] = ()
    mix: tuple[tuple[str, float], ...] = ()
    task: str | None = None
    mode: str = "mixture"


@dataclass
class Routing:
    """The router's answer for a batch of n inputs; entry i is input i.

    ``adapters[i]`` / ``weights[i]``: the adapter names and their weights (empty for the base model);
    ``similarities[i]``: the retrieval scores of those adapters (soup: the chosen domain's), or None where nothing
    was retrieved; ``modes[i]``: the composition (``mixture`` or ``fusion``); ``extra[i]``: more fields for the
    input's record (e.g. Adapter Soup's domain); ``meta``: what a results file records (e.g. ``retrieval_s``).
    """

    adapters: list[list[str]]
    weights: list[list[float]]
    similarities: list[list[float] | None]
    modes: list[str]
    extra: list[dict]
    meta: dict = field(default_factory=dict)

    def label(self, i: int) -> str:
        """``base``, ``selection`` (one adapter) or the composition mode of input i."""
        if not self.adapters[i]:
            return "base"
        return "selection" if len(self.adapters[i]) == 1 else self.modes[i]

    def applied(self, i: int, domains: dict[str, str]) -> list[dict]:
        """Input i's adapters as ``{name, domain, similarity, weight}`` records (what the server reports)."""
        sims = self.similarities[i] or [None] * len(self.adapters[i])
        return [{"name": n, "domain": domains.get(n, ""), "similarity": s, "weight": float(w)}
                for n, s, w in zip(self.adapters[i], sims, self.weights[i])]


SERVER_QUERY_BATCH = 4  # queries per batch when a server embeds them (Router.embed)


class Router:
    """Answers :meth:`route` over one pool.

    Args:
        names: the pool's adapter names, in pool order.  domains: each adapter's domain, in the same order.
        retriever: a :class:`utils.retrieval.LoraRetriever` over the pool's adapters with a card, or None (then
            ``auto`` and ``soup`` are refused).
        tasks: a :class:`utils.task_library.TaskIndex` (the task library and each task's adapter ranking), or None
            (then ``lorauter`` is refused); settable later, as scoring it takes a while.
    """

    def __init__(self, names: list[str], domains: list[str] | None = None, retriever=None, cache_queries: bool = True,
                 tasks=None):
        self.cache_queries = cache_queries  # False for a server: its query lists never repeat, so none is written to the cache
        self.names = list(names)
        self.domains = list(domains) if domains is not None else [""] * len(self.names)
        self.retriever = retriever
        self.tasks = tasks

    @property
    def embedder(self):
        """The sentence embedder of inputs: the retriever's, else the task library's."""
        if self.retriever is not None:
            return self.retriever.embedder
        return getattr(self.tasks, "embedder", None)

    @property
    def domain_of(self) -> dict[str, str]:
        return dict(zip(self.names, self.domains))

    def add(self, name: str, domain: str = "", samples: list[str] | None = None) -> None:
        """A new adapter: retrievable when it has ``samples`` (its card), else usable by name only."""
        if name in self.names:
            raise ValueError(f"Adapter {name!r} is already routed.")
        if samples:
            if self.retriever is None:
                raise ValueError("This router has no retriever; an adapter with samples cannot join retrieval.")
            self.retriever.add(name, samples)
        self.names = self.names + [name]
        self.domains = self.domains + [domain]

    def remove(self, name: str) -> None:
        """``name`` is no longer routed: not retrieved, not nameable."""
        j = self.names.index(name)
        self.names = self.names[:j] + self.names[j + 1:]
        self.domains = self.domains[:j] + self.domains[j + 1:]
        if self.retriever is not None and name in self.retriever.names:
            self.retriever.remove(name)
        if self.tasks is not None:
            self.tasks.drop_adapter(name)

    def retrievable(self, name: str) -> bool:
        return self.retriever is not None and name in self.retriever.names

    @staticmethod
    def embeds(route: Route) -> bool:
        """Whether answering ``route`` embeds its query (retrieval, soup, routing through tasks)."""
        return route.method in EMBEDDED_METHODS

    def embed(self, queries: list[str]) -> np.ndarray:
        """The queries' embeddings [len(queries), d], as :meth:`route` computes them (a server computes them ahead, off
        its decoding thread, and hands them to :meth:`route`)."""
        encode = self.embedder.encode
        # A server's queries (not cached) go in batches of a few: sentence-transformers pads each batch to its longest
        # text, and a server embeds whatever arrived together, of any lengths: 16 of the suite's queries took 143 ms in
        # batches of 4 against 235 ms in one batch, 64 took 502 against 1,226 ms (bench/bench_query_embedding.py).
        return encode(queries) if self.cache_queries else encode(queries, cache=False, batch_size=SERVER_QUERY_BATCH)

    def route(self, queries: list[str], routes: list[Route], embeddings: list[np.ndarray | None] | None = None) -> Routing:
        """Adapters, weights, similarities and mode for each ``queries[i]`` as ``routes[i]`` asks; ``embeddings[i]``,
        where given, is the query's embedding computed ahead (:meth:`embed`), the others are embedded here."""
        if len(queries) != len(routes):
            raise ValueError(f"{len(queries)} queries but {len(routes)} routes.")
        n = len(routes)
        out = Routing([[] for _ in range(n)], [[] for _ in range(n)], [None] * n, ["mixture"] * n, [{} for _ in range(n)])
        embedded = [i for i, r in enumerate(routes) if self.embeds(r)]
        emb = None
        t0 = time.perf_counter()
        if embedded:
            if any(routes[i].method in ("auto", "soup") for i in embedded) and self.retriever is None:
                raise InputError("Retrieval was asked for, but no retriever is loaded (the pool is empty, or its adapters have no "
                                 "cards: route through tasks with 'lorauter', or by name).")
            if any(routes[i].method == "lorauter" for i in embedded) and self.tasks is None:
                raise InputError("Routing through tasks (lorauter) was asked for, but no task library is loaded; start with "
                                 "--routing lorauter or give --task_library.")
            ahead = embeddings or [None] * n
            todo = [i for i in embedded if ahead[i] is None]
            fresh = dict(zip(todo, self.embed([queries[i] for i in todo]))) if todo else {}
            emb = np.stack([ahead[i] if ahead[i] is not None else fresh[i] for i in embedded])  # [len(embedded), d]
            row_of = {i: j for j, i in enumerate(embedded)}
            self._auto(out, routes, emb, row_of)
            self._soup(out, routes, emb, row_of)
            self._lorauter(out, routes, emb, row_of)
            out.meta["retrieval_s"] = time.perf_counter() - t0
        for i, r in enumerate(routes):
            if r.method in ("auto", "soup", "base", "lorauter"):  # answered above, or no adapter
                continue
            if r.method == "mix":
                names, weights = [n for n, _ in r.mix], [float(w) for _, w in r.mix]
            elif r.method == "own":
                if r.task is None:
                    raise ValueError("Route 'own' (perfect selection) needs the input's task.")
                names, weights = [r.task], [1.0]
            elif r.method == "soup_all":
                ban = set(r.exclude)
                names = [m for m in self.names if m not in ban]
                weights = [1.0 / len(names)] * len(names)
            else:
                raise ValueError(f"Unknown routing method {r.method!r}; use one of {', '.join(METHODS)}.")
            out.adapters[i], out.weights[i] = names, weights
            out.modes[i] = "fusion" if r.method == "soup_all" else r.mode
        return out

    def _auto(self, out: Routing, routes: list[Route], emb: np.ndarray, row_of: dict) -> None:
        """Top-k retrieval and its weights, one search per (k, weighting, temperature)."""
        from utils.retrieval import composition_weights

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(routes):
            if r.method == "auto":
                groups.setdefault((r.k, r.weighting, r.temperature), []).append(i)
        for (k, weighting, temperature), members in groups.items():
            names, scores = self.retriever.search_embeddings(emb[[row_of[i] for i in members]], k,
                                                             exclude=[routes[i].exclude for i in members])
            weights = composition_weights(scores, weighting, temperature)
            for j, i in enumerate(members):
                out.adapters[i] = names[j]
                out.weights[i] = [float(w) for w in weights[j]]
                out.similarities[i] = [float(s) for s in scores[j]]
                out.modes[i] = routes[i].mode

    def _lorauter(self, out: Routing, routes: list[Route], emb: np.ndarray, row_of: dict) -> None:
        """Through the nearest tasks to their best adapters (:func:`utils.task_library.route_through_tasks`)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(routes):
            if r.method == "lorauter":
                groups.setdefault((r.k, r.temperature), []).append(i)
        for (k, temperature), members in groups.items():
            answers = self.tasks.route(emb[[row_of[i] for i in members]], k, temperature, [routes[i].exclude for i in members])
            for i, (names, weights, extra) in zip(members, answers):
                out.adapters[i], out.weights[i], out.extra[i] = names, weights, extra
                out.modes[i] = routes[i].mode

    def _soup(self, out: Routing, routes: list[Route], emb: np.ndarray, row_of: dict) -> None:
        """Adapter Soup's nearest domain, its adapters fused with uniform weights."""
        from utils.baselines.soup import nearest_domain

        members = [i for i, r in enumerate(routes) if r.method == "soup"]
        if not members:
            return
        domain_of = self.domain_of
        chosen, domains, sims = nearest_domain(self.retriever, emb[[row_of[i] for i in members]],
                                               [domain_of.get(n, "") for n in self.retriever.names],
                                               [routes[i].exclude for i in members])
        for j, i in enumerate(members):
            out.adapters[i] = chosen[j]
            out.weights[i] = [1.0 / len(chosen[j])] * len(chosen[j])
            out.similarities[i] = [float(sims[j])]
            out.modes[i] = "fusion"
            out.extra[i] = {"soup_domain": domains[j]}
