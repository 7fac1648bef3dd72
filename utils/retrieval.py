"""Stage: retrieval. Embedding inputs and finding the top-k adapters for each one.

Each pool adapter j is represented by the embeddings of its ``sample`` inputs (each L2-normalised), either

    normalized_mean (default):  v_j = normalize(mean_i e(s_ji))   (score = cosine similarity), or
    mean (the paper's code):    v_j = mean_i e(s_ji)              (not re-normalised: |v_j| <= 1, larger when the
                                                                   samples sit close together), v: [N, d].

A query q is embedded as e(q) (normalised) and scored against every adapter by inner product:
score_qj = <e(q), v_j>. With ``mean``, an adapter with tightly clustered samples scores higher than one with
spread samples at the same angle. The index is a FAISS inner-product index.

Embeddings are computed in batches with the retrieval instruction given as the sentence-transformers
``prompt``. For INSTRUCTOR-style models (the paper's retriever) the instruction is excluded from the
pooling (``Pooling.include_prompt = False``), which is how current sentence-transformers supports them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PAPER_INSTRUCTION = "Represent the sentence for similar task retrieval: "
# Past this many adapters an approximate HNSW index answers in sub-linear time; below it the exact
# flat index is both exact and fast enough (see docs/benchmarks.md).
HNSW_THRESHOLD = 200_000


POOLING_CHOICES = {"auto": None, "yes": True, "no": False}
ADAPTER_VECTORS = ("normalized_mean", "mean")


def embedding_cache_dir(value: str | None):
    """The ``--embedding_cache`` flag as a folder: <cache>/embeddings by default, None for 'none'."""
    from utils.model_loading import cache_dir

    if value is None:
        return cache_dir() / "embeddings"
    return None if value.lower() == "none" else Path(value)


def exclude_prompt_choice(value: str) -> bool | None:
    """The ``--exclude_prompt_from_pooling`` flag (auto / yes / no) as :class:`Embedder` takes it."""
    if value not in POOLING_CHOICES:
        raise ValueError(f"--exclude_prompt_from_pooling must be one of {', '.join(POOLING_CHOICES)} (got {value!r}).")
    return POOLING_CHOICES[value]


class Embedder:
    """A sentence-transformers model with a retrieval instruction.

    Args:
        name_or_path: sentence-transformers model id, local directory or ``embedded:...`` name.
        instruction: text given as ``prompt`` to every encode call ("" for none).
        exclude_prompt_from_pooling: None = decide from the name (INSTRUCTOR-style ids contain "instructor"
            or "lora_retriever"); True / False force it.
    """

    def __init__(self, name_or_path: str, instruction: str = PAPER_INSTRUCTION, device: str = "cpu",
                 exclude_prompt_from_pooling: bool | None = None, batch_size: int = 64, cache_dir: str | Path | None = None):
        from utils.model_loading import resolve_model_path

        if exclude_prompt_from_pooling is None:
            lowered = name_or_path.lower()
            exclude_prompt_from_pooling = "instructor" in lowered or "lora_retriever" in lowered
        self.name = name_or_path
        self.path = resolve_model_path(name_or_path)
        self.device = device
        self.instruction = instruction
        self.batch_size = batch_size
        self.exclude_prompt_from_pooling = exclude_prompt_from_pooling
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._identity = _model_identity(name_or_path, self.path)
        self._model = None
        self._lock = threading.Lock()  # a server encodes from two threads (embedding ahead, and pool changes)

    @property
    def model(self):
        """The SentenceTransformer, loaded on first use (a run served from the embedding cache never loads it)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer
            from sentence_transformers.sentence_transformer.modules import Pooling

            try:
                model = SentenceTransformer(self.path, device=self.device)
            except OSError as err:
                raise ValueError(f"Could not load retriever {self.name!r}: {err}. Pass a local sentence-transformers directory "
                                 f"or a reachable id with --retriever.") from err
            if self.exclude_prompt_from_pooling:
                for module in model.modules():
                    if isinstance(module, Pooling):
                        module.include_prompt = False
            self._model = model
        return self._model

    def encode(self, texts: list[str], show_progress: bool = False, cache: bool = True, batch_size: int | None = None) -> np.ndarray:
        """Normalised float32 embeddings [len(texts), d], encoded in batches.

        With a ``cache_dir``, the embeddings of a whole list are stored under a hash of the model's identity
        (name, and the file times of a local model directory), the instruction, the pooling mode and the texts,
        so that the runs of a sweep embed the same pool and queries once. ``cache=False`` skips that (a server's
        queries, which never repeat as a list). ``batch_size`` overrides the embedder's for this call.
        """
        use_cache, cache = cache, None
        if self.cache_dir is not None and use_cache:
            h = hashlib.sha256(json.dumps([self._identity, self.instruction, self.exclude_prompt_from_pooling, list(texts)]).encode())
            cache = self.cache_dir / f"{h.hexdigest()[:32]}.npy"
            if cache.is_file():
                return np.load(cache)
        emb = self._encode(texts, show_progress, batch_size)
        if cache is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, emb)
            os.replace(tmp, cache)
        return emb

    def card_means(self, cards: list[list[str]]) -> np.ndarray:
        """The plain mean embedding [len(cards), d] of each card (an adapter's sample inputs), float32.

        With a ``cache_dir``, each card's mean is stored on its own under ``cards/`` (a hash of the model's identity,
        the instruction, the pooling mode and the card's texts), so that a pool that gains or loses adapters, or a
        restart, embeds only the cards it has not seen; the missing cards are embedded together in one call, each
        distinct text once.
        """
        means: list[np.ndarray | None] = [None] * len(cards)
        paths = [None] * len(cards)
        if self.cache_dir is not None:
            folder = self.cache_dir / "cards"
            for i, card in enumerate(cards):
                h = hashlib.sha256(json.dumps([self._identity, self.instruction, self.exclude_prompt_from_pooling, list(card)]).encode())
                paths[i] = folder / f"{h.hexdigest()[:32]}.npy"
                if paths[i].is_file():
                    means[i] = np.load(paths[i])
        missing = [i for i, m in enumerate(means) if m is None]
        if missing:
            if len(missing) > 100:
                logger.info("Embedding the cards of %d adapters (cached for the next start)", len(missing))
            flat = [s for i in missing for s in cards[i]]
            unique = list(dict.fromkeys(flat))  # a text shared by several cards is embedded once
            emb = self._encode(unique, show_progress=len(missing) > 100)
            if len(unique) < len(flat):
                row = {t: j for j, t in enumerate(unique)}
                emb = emb[[row[t] for t in flat]]
            start = 0
            for i in missing:
                means[i] = emb[start:start + len(cards[i])].mean(0).astype(np.float32)
                start += len(cards[i])
                if paths[i] is not None:
                    paths[i].parent.mkdir(parents=True, exist_ok=True)
                    tmp = paths[i].with_name(f"{paths[i].stem}.{os.getpid()}.tmp.npy")
                    np.save(tmp, means[i])
                    os.replace(tmp, paths[i])
        d = means[0].shape[0] if means else 0
        return np.stack(means).astype(np.float32) if means else np.zeros((0, d), dtype=np.float32)

    def _encode(self, texts: list[str], show_progress: bool, batch_size: int | None = None) -> np.ndarray:
        with self._lock, torch.inference_mode():
            emb = self.model.encode(list(texts), prompt=self.instruction or None, batch_size=batch_size or self.batch_size,
                                    convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(emb, dtype=np.float32)


def _model_identity(name: str, path: str) -> list:
    """Name plus the newest file time of a local model directory (a retrained model in place gets a new identity)."""
    p = Path(path)
    if p.is_dir():
        return [name, max((f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()), default=0)]
    return [name]


def build_index(vectors: np.ndarray, kind: str = "auto"):
    """FAISS inner-product index over ``vectors`` [N, d] (float32, normalised).

    ``kind``: "flat" (exact), "hnsw" (approximate, for very large pools) or "auto" (flat below
    HNSW_THRESHOLD vectors, else hnsw).
    """
    import faiss

    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n < HNSW_THRESHOLD else "hnsw"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"Unknown index kind {kind!r}; use flat, hnsw or auto.")
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


class LoraRetriever:
    """Top-k adapter retrieval over a pool represented by mean sample embeddings.

    Args:
        embedder: the :class:`Embedder` for queries and samples.
        names: adapter names, in pool order.  samples: each adapter's example inputs.
        adapter_vector: ``normalized_mean`` (cosine to the mean direction) or ``mean`` (the paper's code: the plain
            mean, so its norm counts; module docstring).
    """

    def __init__(self, embedder: Embedder, names: list[str], samples: list[list[str]], index_kind: str = "auto",
                 adapter_vector: str = "normalized_mean"):
        if len(names) != len(samples):
            raise ValueError("names and samples must have the same length.")
        if adapter_vector not in ADAPTER_VECTORS:
            raise ValueError(f"Unknown adapter vector {adapter_vector!r}; use one of {', '.join(ADAPTER_VECTORS)}.")
        self.adapter_vector = adapter_vector
        self.embedder = embedder
        self.index_kind = index_kind
        self.names = list(names)
        self.vectors = self._vectors(samples)  # [N, d]
        self.index = build_index(self.vectors, index_kind)

    def _vectors(self, samples: list[list[str]]) -> np.ndarray:
        """Adapter vectors [len(samples), d] of cards (module docstring)."""
        if any(not group for group in samples):
            raise ValueError("Every adapter needs at least one sample input to be retrieved.")
        if hasattr(self.embedder, "card_means"):
            means = self.embedder.card_means(samples)
        else:  # an embedder with encode() only
            flat = [s for group in samples for s in group]
            emb, start, rows = self.embedder.encode(flat), 0, []
            for group in samples:
                rows.append(emb[start:start + len(group)].mean(0))
                start += len(group)
            means = np.stack(rows)
        if self.adapter_vector == "normalized_mean":
            means = np.stack([m / max(np.linalg.norm(m), 1e-12) for m in means])
        return np.ascontiguousarray(means, dtype=np.float32)

    def add(self, name: str, samples: list[str]) -> None:
        """Add adapter ``name`` represented by ``samples`` (its card); the index is rebuilt."""
        if name in self.names:
            raise ValueError(f"Adapter {name!r} is already retrievable.")
        vector = self._vectors([list(samples)])
        self.vectors = np.concatenate([self.vectors, vector]) if len(self.names) else vector
        self.names = self.names + [name]  # a new list: a copy of this retriever (copy.copy) keeps its own
        self.index = build_index(self.vectors, self.index_kind)

    def remove(self, name: str) -> None:
        """Stop retrieving adapter ``name``; the index is rebuilt."""
        j = self.names.index(name)
        self.names = self.names[:j] + self.names[j + 1:]
        self.vectors = np.delete(self.vectors, j, axis=0)
        self.index = build_index(self.vectors, self.index_kind)

    def search_embeddings(self, queries: np.ndarray, k: int, exclude: list | None = None):
        """Top-k names and scores for query embeddings [n, d].

        ``exclude[i]`` (the row's own task for OOD, or a collection of names) is removed before the top k are
        taken, so k results are still returned when the pool has more than k other adapters.
        Returns (names: list of n lists of k names, scores: float32 [n, k]).
        """
        n_pool = len(self.names)
        bans = [as_ban(e) for e in exclude] if exclude is not None else [frozenset()] * len(queries)
        known = set(self.names)
        extra = max((len(b & known) for b in bans), default=0)
        if k < 1 or k + extra > n_pool:
            raise ValueError(f"Cannot retrieve k={k} adapters from a pool of {n_pool}"
                             + (" with the own task excluded" if extra == 1 else f" with {extra} adapters excluded" if extra else "") + ".")
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k + extra, n_pool))
        out_names, out_scores = [], []
        for i in range(len(queries)):
            ban = bans[i]
            picked = [(self.names[j], float(s)) for j, s in zip(ids[i], scores[i]) if j >= 0 and self.names[j] not in ban][:k]
            if len(picked) < k:  # approximate index returned too few: fall back to exact scores
                exact = self.vectors @ queries[i]
                order = np.argsort(-exact)
                picked = [(self.names[j], float(exact[j])) for j in order if self.names[j] not in ban][:k]
            out_names.append([p[0] for p in picked])
            out_scores.append([p[1] for p in picked])
        return out_names, np.asarray(out_scores, dtype=np.float32)

    def search(self, texts: list[str], k: int, exclude: list[str | None] | None = None):
        """Embed ``texts`` in batches and return their top-k adapters (see :meth:`search_embeddings`)."""
        return self.search_embeddings(self.embedder.encode(texts), k, exclude)


def as_ban(e) -> frozenset:
    """An exclusion entry (None, one name, or a collection of names) as a set of names."""
    if e is None or e == "":
        return frozenset()
    if isinstance(e, str):
        return frozenset([e])
    return frozenset(e)


def composition_weights(scores: np.ndarray, scheme: str = "uniform", temperature: float = 1.0) -> np.ndarray:
    """Weights w [n, k] from retrieval scores [n, k].

    uniform (the paper): w_bj = 1/k.  softmax: w_bj = exp(score_bj / T) / sum_j exp(score_bj / T).
    """
    n, k = scores.shape
    if scheme == "uniform":
        return np.full((n, k), 1.0 / k, dtype=np.float32)
    if scheme == "softmax":
        z = scores / temperature
        z = np.exp(z - z.max(1, keepdims=True))
        return (z / z.sum(1, keepdims=True)).astype(np.float32)
    raise ValueError(f"Unknown weighting {scheme!r}; use uniform or softmax.")
