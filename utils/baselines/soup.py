"""Stage: Adapter Soup's choice of adapters (a baseline): the adapters of the domain nearest to the input.

The chosen adapters are fused with uniform weights (``fusion`` composition), as Adapter Soup averages their weights.
"""

from __future__ import annotations

import numpy as np

from utils.retrieval import LoraRetriever, as_ban


def nearest_domain(retriever: LoraRetriever, queries: np.ndarray, domains: list[str], exclude: list | None = None):
    """Adapter Soup's choice: for each query, the adapters of the domain whose centroid is nearest.

    A domain's centroid is the mean of its member adapters' vectors (``retriever.vectors``, built as
    ``--adapter_vector`` says), re-normalised with ``normalized_mean`` so that domains compare by cosine; it is
    scored against the query embedding by inner product, as adapters are. ``exclude[i]`` (OOD: the row's own task)
    is removed from its domain before the centroid is taken, and a domain left empty is skipped.

    Args:
        queries: [n, d] normalised query embeddings.  domains: the domain of each adapter, in ``retriever.names`` order.
    Returns:
        (adapters: n lists of names, the chosen domain's members in pool order; domain names [n]; scores [n]).
    """
    if len(domains) != len(retriever.names):
        raise ValueError("domains must give one domain per pool adapter.")
    members: dict[str, list[int]] = {}
    for j, d in enumerate(domains):
        members.setdefault(d, []).append(j)
    names = list(members)

    def centroid(ids: list[int]) -> np.ndarray:
        c = retriever.vectors[ids].mean(0)
        return c / max(float(np.linalg.norm(c)), 1e-12) if retriever.adapter_vector == "normalized_mean" else c

    full = np.stack([centroid(members[d]) for d in names])  # [D, d]
    bans = [as_ban(e) for e in exclude] if exclude is not None else [frozenset()] * len(queries)
    chosen, chosen_domains, out_scores = [], [], []
    for i, q in enumerate(np.asarray(queries, dtype=np.float32)):
        scores = full @ q
        ban = bans[i]
        if ban:
            for di, d in enumerate(names):
                kept = [j for j in members[d] if retriever.names[j] not in ban]
                if len(kept) != len(members[d]):
                    scores[di] = centroid(kept) @ q if kept else -np.inf
        if not np.isfinite(scores).any():
            raise ValueError("No adapter is left to choose from after the exclusion.")
        best = int(np.argmax(scores))
        chosen.append([retriever.names[j] for j in members[names[best]] if retriever.names[j] not in ban])
        chosen_domains.append(names[best])
        out_scores.append(float(scores[best]))
    return chosen, chosen_domains, np.asarray(out_scores, dtype=np.float32)
