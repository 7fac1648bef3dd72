"""Stage: scoring adapters on tasks. The task x adapter score matrix that LoRAuter routes with.

Each adapter alone (selection, weight 1) is scored on a task's validation rows by one of two scorers:

    loglik   the mean over rows of the mean log-likelihood per target token (the target and EOS after the prompt,
             the same encoding as LoRA training and LoraHub's loss): one forward pass per row, no generation
    metric   the task's own metric (EM, BLEU or ROUGE-L) on greedy answers (what LoRAuter's authors score with):
             up to ``max_new_tokens`` decoding steps per row

Pairs (row, adapter) of one task are batched together, each row composed with its own adapter
(:class:`utils.composition.LiveComposition`), so a batch mixes adapters.

**Successive halving** (``halving=True``) narrows the candidates instead of scoring every pair on every row: all
candidates are scored on the first n0 rows, the better half (rounded up) is kept, n doubles, until one candidate is
left or n reaches the task's rows; the survivors are scored on every row. With A adapters, R rows and n0 rows at the
first rung, and every row scored once (the cache keeps rows, so a rung scores only the rows it adds), that costs
about n0 * A * (1 + log2(min(A, R / n0)) / 2) row forwards against R * A for the full matrix (:func:`halving_cost`).
An adapter's place in a task's ranking is decided by the last rung it reached, then by its score there; the rung
(rows scored) is kept beside the score.

**The cache** (a JSON file, written atomically) keeps each row's score (the loglik scorer) or greedy answer (the metric
scorer), keyed by the scorer and its setting, the adapter's content (a hash of its config and weight files) and the
row's content (input, and target for loglik), so that an unchanged (adapter, row) pair is never scored twice: a
halving rung scores only the rows it adds, a pool that gains an adapter or a library that gains a task scores only
the new pairs, a changed adapter is scored again, and a task that changes scores only its changed rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SCORERS = ("loglik", "metric")


def adapter_digest(path: str | Path) -> str:
    """A hash of an adapter directory's config and weight files (their bytes), or of the path for a hub id."""
    p = Path(path)
    if not p.is_dir():
        return hashlib.sha256(f"hub:{path}".encode()).hexdigest()[:24]
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name == "adapter_config.json"):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:24]


class ScoreCache:
    """Per-row scores on disk (module docstring); ``path`` None keeps them in memory only. Thread-safe.

    Layout: ``{"version": 2, "rows": {group: {row: value}}}`` where a group is a scorer, its setting and an
    adapter's content digest, a row is :meth:`utils.task_library.Task.row_digest`, and a value is the row's mean
    target log-likelihood (``loglik``) or its greedy answer (``metric``)."""

    VERSION = 2

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.rows: dict[str, dict[str, float | str]] = {}
        self._lock = threading.Lock()
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == self.VERSION:
                    self.rows = {g: dict(v) for g, v in data.get("rows", {}).items()}
                else:
                    logger.info("The score cache %s has an older layout (version %s); scores are recomputed", self.path,
                                data.get("version"))
            except (OSError, ValueError, AttributeError) as err:
                logger.warning("Ignoring the unreadable score cache %s (%s); scores are recomputed", self.path, err)

    @staticmethod
    def group(scorer: str, adapter: str, setting: str = "") -> str:
        return f"{scorer}|{setting}|{adapter}"

    def get(self, group: str, rows: list[str]) -> list[float | str | None]:
        with self._lock:
            got = self.rows.get(group, {})
            return [got.get(r) for r in rows]

    def put(self, group: str, values: dict[str, float | str]) -> None:
        with self._lock:
            self.rows.setdefault(group, {}).update(values)
            self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        with self._lock:
            payload = json.dumps({"version": self.VERSION, "rows": self.rows}, indent=0, sort_keys=True)
            self.dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(payload)
        os.replace(tmp, self.path)


@dataclass
class ScoreMatrix:
    """Scores [T, A] of adapters on tasks (NaN where a pair was not scored) and rows [T, A], the rows each score is on."""

    tasks: list[str]
    adapters: list[str]
    scores: np.ndarray
    rows: np.ndarray
    forwards: int = 0  # row forwards (loglik) or generated rows (metric) computed now, cache hits excluded
    pairs: int = 0  # (task, adapter, rows) scores computed now
    cached: int = 0  # scores read from the cache

    def with_adapter(self, name: str, scores: list[float], rows: list[int]) -> "ScoreMatrix":
        """This matrix with one more adapter's column (its score and rows on each task); a new object."""
        if name in self.adapters:
            keep = [i for i, a in enumerate(self.adapters) if a != name]
            base = ScoreMatrix(self.tasks, [self.adapters[i] for i in keep], self.scores[:, keep], self.rows[:, keep])
            return base.with_adapter(name, scores, rows)
        return ScoreMatrix(self.tasks, self.adapters + [name], np.concatenate([self.scores, np.asarray(scores, dtype=float)[:, None]], 1),
                           np.concatenate([self.rows, np.asarray(rows, dtype=np.int64)[:, None]], 1), self.forwards, self.pairs, self.cached)

    def without_adapter(self, name: str) -> "ScoreMatrix":
        keep = [i for i, a in enumerate(self.adapters) if a != name]
        return ScoreMatrix(self.tasks, [self.adapters[i] for i in keep], self.scores[:, keep], self.rows[:, keep],
                           self.forwards, self.pairs, self.cached)

    def top_rows(self, task: str) -> int:
        """The rows the task's best adapter was scored on (what a newcomer is scored on to compete with it)."""
        t = self.tasks.index(task)
        return int(self.rows[t].max()) if self.rows.shape[1] else 0

    def ranking(self, task: str) -> list[str]:
        """The task's scored adapters, best first: by rows scored (the last rung reached), then score, then name."""
        t = self.tasks.index(task)
        scored = [a for a in range(len(self.adapters)) if not np.isnan(self.scores[t, a])]
        return [self.adapters[a] for a in sorted(scored, key=lambda a: (-self.rows[t, a], -self.scores[t, a], self.adapters[a]))]

    def rankings(self) -> dict[str, list[str]]:
        return {t: self.ranking(t) for t in self.tasks}

    def best(self) -> dict[str, str | None]:
        return {t: (r[0] if r else None) for t, r in self.rankings().items()}

    def as_json(self) -> dict:
        return {"tasks": self.tasks, "adapters": self.adapters,
                "scores": [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in self.scores],
                "rows": self.rows.astype(int).tolist(), "best": self.best(), "forwards": self.forwards, "pairs": self.pairs,
                "cached": self.cached}


def halving_cost(adapters: int, rows: int, first: int) -> int:
    """Row forwards successive halving needs for one task from an empty cache (module docstring): each rung scores its
    candidates on the rows the previous rung did not."""
    total, done, n, cands = 0, 0, min(first, rows), adapters
    while True:
        total += (n - done) * cands
        if cands <= 2 or n >= rows:  # the better of the last two is the winner: no rung for a lone survivor
            return total
        cands, done, n = math.ceil(cands / 2), n, min(rows, n * 2)


class TaskScorer:
    """Scores adapters of ``pool`` (an :class:`utils.adapter_pool.AdapterPool`) on tasks (module docstring).

    Args:
        pool: the adapters' weights on the base model.  tokenizer, prompter: how rows become prompts.
        scorer: ``loglik`` or ``metric``.  cache: a :class:`ScoreCache`.  batch_size: rows per forward.
        max_length: tokens of prompt and target (loglik).  max_new_tokens: tokens generated per row (metric).
        paths: adapter name -> its directory (what the cache keys its content by).
        composition: an active :class:`utils.composition.LiveComposition` to score through (a server's, whose hooks
            stay on the model: scoring then runs on the thread that owns the model, between decoding steps, under
            serials of its own); None: one of its own for each call. Only ``loglik`` scores through a shared one.
    """

    def __init__(self, pool, tokenizer, prompter, paths: dict[str, str], scorer: str = "loglik", cache: ScoreCache | None = None,
                 batch_size: int = 16, max_length: int = 256, max_new_tokens: int = 40, composition=None):
        if scorer not in SCORERS:
            raise ValueError(f"Unknown task scorer {scorer!r}; use one of {', '.join(SCORERS)}.")
        if composition is not None and scorer != "loglik":
            raise ValueError("Scoring through a shared composition (a server's) takes the loglik scorer.")
        self.composition = composition
        self._serial = -1  # serials below 0: never a decoder's
        self.pool, self.tokenizer, self.prompter, self.scorer = pool, tokenizer, prompter, scorer
        self.paths = dict(paths)
        self.cache = cache or ScoreCache(None)
        self.batch_size, self.max_length, self.max_new_tokens = batch_size, max_length, max_new_tokens
        self._digests: dict[str, str] = {}
        self.forwards = 0

    def add_path(self, name: str, path: str) -> None:
        self.paths[name] = path
        self._digests.pop(name, None)

    def digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = adapter_digest(self.paths[name])
        return self._digests[name]

    def _group(self, name: str) -> str:
        setting = f"len{self.max_length}" if self.scorer == "loglik" else f"new{self.max_new_tokens}"
        return ScoreCache.group(self.scorer, self.digest(name), setting)

    def scores(self, task, adapters: list[str], rows: int) -> tuple[list[float], int]:
        """Each adapter's score on the first ``rows`` rows of ``task``, and how many adapters had every row cached.

        Rows are cached one by one, so a later rung of successive halving (more rows) computes only the rows it adds,
        and a task that gains or changes rows computes only those."""
        rows = min(rows, len(task.inputs))
        row_keys = [task.row_digest(j, with_target=self.scorer == "loglik") for j in range(rows)]
        values = {a: self.cache.get(self._group(a), row_keys) for a in adapters}
        missing = [(a, j) for a in adapters for j in range(rows) if values[a][j] is None]
        if missing:
            new = self._loglik(task, missing) if self.scorer == "loglik" else self._answers(task, missing)
            self.forwards += len(missing)
            for (a, j), v in zip(missing, new):
                values[a][j] = v
            for a in dict.fromkeys(a for a, _ in missing):
                self.cache.put(self._group(a), {row_keys[j]: values[a][j] for j in range(rows)})
        if self.scorer == "loglik":
            out = [float(np.mean([float(v) for v in values[a]])) for a in adapters]
        else:
            out = [metric_score(task.metric, [str(v) for v in values[a]], task.targets[:rows]) for a in adapters]
        return out, len(adapters) - len({a for a, _ in missing})

    @torch.inference_mode()
    def _loglik(self, task, pairs: list[tuple[str, int]]) -> list[float]:
        """Mean log-likelihood per target token of each (adapter, row) pair."""
        from utils.composition import LiveComposition
        from utils.prompter import collate_supervised, encode_supervised

        encoded = {j: encode_supervised(self.tokenizer, self.prompter, task.inputs[j], task.targets[j], self.max_length)
                   for j in {j for _, j in pairs}}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        order = sorted(range(len(pairs)), key=lambda i: len(encoded[pairs[i][1]][0]))  # similar lengths together
        out = [0.0] * len(pairs)
        live = self.composition or LiveComposition(self.pool)
        device = next(self.pool.model.parameters()).device
        with (nullcontext(self.pool.model) if self.composition is not None else live.active()) as model:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                ids, labels, mask = collate_supervised([encoded[pairs[i][1]] for i in chunk], pad, left=True)
                serials = list(range(self._serial, self._serial - len(chunk), -1))
                self._serial -= len(chunk)
                live.set_rows([(sr, [pairs[i][0]], [1.0], "mixture") for sr, i in zip(serials, chunk)])
                keep = min(int((labels != -100).sum(1).max()) + 1, ids.shape[1])
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                               logits_to_keep=keep).logits[:, :-1].float()
                target = labels[:, -(keep - 1):].to(device)
                lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
                valid = target != -100
                per_row = (lp * valid).sum(1) / valid.sum(1).clamp(min=1)
                for i, v in zip(chunk, per_row.tolist()):
                    out[i] = v
                live.forget(serials)
        return out

    def _answers(self, task, pairs: list[tuple[str, int]]) -> list[str]:
        """Greedy answers of each (adapter, row) pair."""
        from utils.composition import LiveComposition
        from utils.generation import generate_batch, length_sorted_batches

        prompts = [self.prompter.generate_prompt(task.inputs[j]) for _, j in pairs]
        lengths = [len(x) for x in self.tokenizer(prompts).input_ids]
        out = [""] * len(pairs)
        live = LiveComposition(self.pool)
        with live.active() as model:
            for batch in length_sorted_batches(lengths, self.batch_size):
                texts, _ = generate_batch(model, self.tokenizer, [prompts[i] for i in batch], self.max_new_tokens,
                                          composition=live, compositions=[([pairs[i][0]], [1.0], "mixture") for i in batch])
                for i, t in zip(batch, texts):
                    out[i] = t
        return out


def metric_score(metric: str, preds: list[str], targets: list[str]) -> float:
    """A task's own metric on answers: EM, the paper's BLEU, or ROUGE-L."""
    from utils.metrics import score_task

    scores, _ = score_task(metric, preds, targets)
    return float(scores[{"em": "em", "bleu": "bleu", "rouge": "rougeL"}[metric]])


def score_matrix(scorer: TaskScorer, tasks: list, adapters: list[str], rows: int | None = None, halving: bool = True,
                 first: int = 2, progress: bool = True, candidates: dict[str, list[str]] | None = None) -> ScoreMatrix:
    """The task x adapter :class:`ScoreMatrix` of ``adapters`` on ``tasks`` (at most ``rows`` rows of each), by
    successive halving from ``first`` rows (module docstring) or on every pair; ``candidates[task]``, where given,
    the only adapters scored on that task (:func:`nearest_candidates`)."""
    from tqdm.auto import tqdm

    T, A = len(tasks), len(adapters)
    scores = np.full((T, A), np.nan)
    used = np.zeros((T, A), dtype=np.int64)
    forwards0, pairs, cached = scorer.forwards, 0, 0
    for t, task in enumerate(tqdm(tasks, desc=f"Scoring adapters on tasks ({scorer.scorer})", unit="task", disable=not progress)):
        n_rows = min(rows or len(task.inputs), len(task.inputs))
        allowed = set(candidates[task.name]) if candidates is not None and task.name in candidates else None
        cands = [a for a in range(A) if allowed is None or adapters[a] in allowed]
        n = min(first, n_rows) if halving else n_rows
        while cands:
            got, hits = scorer.scores(task, [adapters[a] for a in cands], n)
            pairs += len(cands) - hits
            cached += hits
            for a, v in zip(cands, got):
                scores[t, a], used[t, a] = v, n
            if not halving or len(cands) <= 2 or n >= n_rows:  # of the last two, the better one wins
                break
            keep = sorted(cands, key=lambda a: (-scores[t, a], adapters[a]))[:math.ceil(len(cands) / 2)]
            cands, n = keep, min(n_rows, n * 2)
    scorer.cache.save()
    return ScoreMatrix([t.name for t in tasks], list(adapters), scores, used, scorer.forwards - forwards0, pairs, cached)


def nearest_candidates(embedder, tasks: list, entries, keep: int) -> dict[str, list[str]]:
    """Each task's candidate adapters when the pool is narrowed by embedding first: the ``keep`` adapters whose card
    embeds nearest to the task (cosine of the mean embeddings), and every adapter without a card (nothing to embed)."""
    carded = [e for e in entries if e.samples]
    cardless = [e.name for e in entries if not e.samples]
    if not carded or keep <= 0:
        return {t.name: [e.name for e in entries] for t in tasks}
    def unit(m):
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    from utils.task_library import mean_embeddings

    sims = unit(mean_embeddings(embedder, [t.inputs for t in tasks])) @ unit(mean_embeddings(embedder, [e.samples for e in carded])).T
    return {t.name: [carded[j].name for j in np.argsort(-sims[i], kind="stable")[:keep]] + cardless for i, t in enumerate(tasks)}


def build_task_index(session, entries, args, adapter_pool, tokenizer, prompter, device: str, cache_dir):
    """The :class:`utils.task_library.TaskIndex` of a run or a server: the task library of ``entries`` and
    ``--task_library``, embedded with the retriever's embedder, each task's adapters ranked by the score matrix of
    ``entries`` (scored here, or read from ``--task_scores``). Returns (index, matrix, seconds)."""
    import time

    from utils.model_loading import cache_dir as default_cache
    from utils.retrieval import exclude_prompt_choice
    from utils.task_library import TaskIndex, task_library

    t0 = time.time()
    tasks = task_library(entries, args.task_library)
    where = args.task_scores if args.task_scores is not None else str(default_cache() / "task_scores.json")
    cache = ScoreCache(None if where.lower() == "none" else where)
    scorer = TaskScorer(adapter_pool, tokenizer, prompter, {e.name: e.path for e in entries}, args.task_scorer, cache,
                        max_new_tokens=args.max_new_tokens)
    embedder = session.embedder(args.retriever, args.instruction, exclude_prompt_choice(args.exclude_prompt_from_pooling),
                                device, cache_dir)
    narrowed = nearest_candidates(embedder, tasks, entries, args.task_candidates) if args.task_candidates else None
    matrix = score_matrix(scorer, tasks, [e.name for e in entries], args.task_rows, halving=args.task_search == "halving",
                          candidates=narrowed)
    index = TaskIndex.build(embedder, tasks, matrix.rankings())
    index.matrix, index.scorer = matrix, scorer
    seconds = time.time() - t0
    logger.info("Task library: %d tasks x %d adapters scored in %.1f s (%d pairs computed, %d cached, %d row %s)",
                len(tasks), len(entries), seconds, matrix.pairs, matrix.cached, matrix.forwards,
                "forwards" if args.task_scorer == "loglik" else "generations")
    return index, matrix, seconds
