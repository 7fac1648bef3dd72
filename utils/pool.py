"""Stage: the pool. The LoRAs a run, a prompt session or a server works with, owned by one object.

A :class:`Pool` holds every view of the pool together:

    entries    the pool config's entries (name, domain, card, path), in pool order
    adapters   their weights (:class:`utils.adapter_pool.AdapterPool`: read on first use, in device / host tiers),
               None where nothing is composed in this process
    retriever  their retrieval index (:class:`utils.retrieval.LoraRetriever` over the entries with a card), or None
    router     the :class:`utils.routing.Router` that answers, per input, which adapters with which weights

:func:`build_pool` builds it once from the flags, for ``main.py``'s evaluation, ``generate.py`` and the server alike.
An adapter is known by its name from routing to composition. :meth:`Pool.add` and :meth:`Pool.remove` change every
view or none: an adapter that cannot be read leaves the pool as it was.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from utils.routing import Router

logger = logging.getLogger(__name__)


@dataclass
class Pool:
    """The pool's views, changed together (module docstring)."""

    entries: list
    adapters: object | None
    retriever: object | None
    router: Router

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def domains(self) -> dict[str, str]:
        return {e.name: e.domain for e in self.entries}

    def __contains__(self, name: str) -> bool:
        return any(e.name == name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry, samples: list[str] | None = None, weights=None) -> None:
        """``entry`` joins every view: routing (retrieval when it has ``samples``, its card), the weights (``weights``
        already read with :meth:`AdapterPool.read`, else read on first use), the entries. Changes nothing when it
        fails: :meth:`Router.add` refuses a taken name or a card without a retriever (``ValueError``) before any view
        changes, and a failure to add the weights takes the adapter out of routing again before it is raised."""
        self.router.add(entry.name, entry.domain, samples)  # embeds the card (cached)
        try:
            if self.adapters is not None:
                self.adapters.add(entry, weights)
        except Exception:  # not swallowed: routing is rolled back, then the error goes on to the caller
            self.router.remove(entry.name)
            raise
        self.entries = self.entries + [entry]

    def remove(self, name: str) -> None:
        """``name`` leaves every view; rows already composed with it finish with it (the weights' pins)."""
        if name not in self:
            raise ValueError(f"The adapter {name!r} is not in the pool.")
        self.router.remove(name)
        if self.adapters is not None:
            self.adapters.remove(name)
        self.entries = [e for e in self.entries if e.name != name]


def build_pool(session, entries: list, args, *, device: str, weights: bool = True, retrieval: bool = True,
               cache_dir=None, own: bool = False, cache_queries: bool = True) -> Pool:
    """The :class:`Pool` of ``entries`` on ``session``'s base model, built once.

    Args:
        session: the :class:`utils.session.Session` holding the base model (loaded first) and the embedder.
        entries: the pool config's entries (:func:`utils.data.load_pool_config`).
        args: the flags (``--max_loras``, ``--max_cpu_loras``, ``--eager_load``, ``--retriever``, ``--instruction``,
            ``--exclude_prompt_from_pooling``, ``--adapter_vector``).
        device: the retriever's device.  cache_dir: the embedding cache (None: none).
        weights: read adapter weights here (False where nothing is composed in this process).
        retrieval: build the retriever (False where no input is retrieved for).
        own: a pool of its own that changes at run time (a server's): its own :class:`AdapterPool` and its own copy of
            the session's retriever (whose ``add``/``remove`` rebind its lists, never mutate them); otherwise the
            session's, shared across the runs of a sweep.
        cache_queries: write query embeddings to the cache (False for a server, whose queries never repeat).
    """
    from utils.retrieval import exclude_prompt_choice

    adapters = None
    if weights and entries:
        if own:
            from utils.adapter_pool import AdapterPool

            adapters = AdapterPool(session.model, entries, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                                   eager=args.eager_load)
        else:
            adapters = session.adapter_pool(entries, args.max_loras, args.max_cpu_loras, args.eager_load)
    retriever = None
    carded = [e for e in entries if e.samples]  # an adapter without a card is not retrieved (LoRAuter routes to it)
    if retrieval and carded:
        retriever = session.retriever(carded, args.retriever, args.instruction, exclude_prompt_choice(args.exclude_prompt_from_pooling),
                                      device, cache_dir, args.adapter_vector)
        if own:
            retriever = copy.copy(retriever)
    router = Router([e.name for e in entries], [e.domain for e in entries], retriever, cache_queries=cache_queries)
    return Pool(list(entries), adapters, retriever, router)
