"""Stage: scoring adapters that join a running server against its task library, in the background.

An adapter loaded at run time without a card cannot be retrieved; with a task library (``--routing lorauter`` or
``--task_library``) it can still be routed to once it has been scored on the library's tasks. :class:`LiveScoring`
does that off the request path:

- ``submit(name)`` queues the adapter (PoolAdmin calls it after a load); a worker thread takes one adapter at a time;
- each task is one unit of work: the adapter's mean target log-likelihood on the task's rows (as many rows as the
  task's best adapter was scored on, so that it competes with it directly), computed by
  :class:`utils.task_scores.TaskScorer` through the server's own per-row composition. The model and its composition
  hooks belong to the scheduler thread, so each unit runs there, between two decoding steps
  (:meth:`Scheduler.call`); the worker hands over a unit only when no request is running or waiting, or after
  ``max_defer_s`` seconds, so that scoring yields to traffic (low priority) without starving;
- once every task is scored, the adapter's column joins the score matrix and each task's ranking is recomputed: the
  adapter is routed to for the tasks where it now ranks first. Scores go to the score cache like any other.

``status()`` (shown by ``/health`` and the web page) and the Prometheus metrics report what is queued, being
scored and done.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from utils.cpu_threads import release_openmp_pool

logger = logging.getLogger(__name__)


class LiveScoring:
    """Background scoring of runtime-loaded adapters (module docstring).

    Args:
        engine: the served engine (its scheduler, pool, router with a task index).
        metrics: the server's metrics (``task_scoring_queue`` and ``task_scored`` are updated), or None.
        max_defer_s: the longest a unit waits for the server to be idle before it runs anyway.
    """

    def __init__(self, engine, metrics=None, max_defer_s: float = 2.0):
        self.engine, self.metrics, self.max_defer_s = engine, metrics, max_defer_s
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.queued: list[str] = []
        self.current: dict | None = None  # {"adapter", "tasks_done", "tasks"}
        self.scored: dict[str, list[str]] = {}  # adapter -> the tasks it now ranks first on
        self.failed: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-scoring", daemon=True)
        self._thread.start()

    @property
    def index(self):
        return self.engine.router.tasks

    def submit(self, name: str, path: str) -> None:
        with self._lock:
            self.queued.append(name)
        self._queue.put((name, path))
        self._gauge()

    def status(self) -> dict:
        with self._lock:
            return {"queued": list(self.queued), "scoring": dict(self.current) if self.current else None,
                    "scored": {k: list(v) for k, v in self.scored.items()}, "failed": dict(self.failed),
                    "tasks": len(self.index.names) if self.index is not None else 0}

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """True once nothing is queued or being scored (tests and shutdown)."""
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                if not self.queued and self.current is None:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)

    # -- the worker ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            name, path = item
            with self._lock:
                if name in self.queued:
                    self.queued.remove(name)
                self.current = {"adapter": name, "tasks_done": 0, "tasks": len(self.index.names)}
            try:
                self._score(name, path)
            except Exception as err:  # an adapter that cannot be scored stays routable by name; the reason is shown
                logger.warning("Scoring adapter %s on the task library failed: %s", name, err)
                with self._lock:
                    self.failed[name] = f"{type(err).__name__}: {err}"
            finally:
                with self._lock:
                    self.current = None
                self._gauge()
                release_openmp_pool()  # the scheduler's thread keeps the only OpenMP pool (utils/cpu_threads.py)

    def _score(self, name: str, path: str) -> None:
        index = self.index
        scorer, matrix = index.scorer, index.matrix
        scorer.add_path(name, path)
        scores, rows = [], []
        for task in index.tasks:
            if self._stop.is_set():
                return
            n = matrix.top_rows(task.name) or len(task.inputs)
            self._yield_to_traffic()
            got = self.engine.scheduler.call(lambda task=task, n=n: scorer.scores(task, [name], n)[0][0]).result(timeout=600)
            if name not in self.engine.pool:  # unloaded meanwhile: nothing to rank
                return
            scores.append(got)
            rows.append(min(n, len(task.inputs)))
            with self._lock:
                self.current["tasks_done"] += 1
        scorer.cache.save()

        def join():  # on the scheduler thread, like every pool change: routing never sees half a ranking
            if name not in self.engine.pool:
                return []
            index.matrix = index.matrix.with_adapter(name, scores, rows)
            index.set_rankings(index.matrix.rankings())
            return [t for t, r in index.rankings.items() if r and r[0] == name]

        wins = self.engine.scheduler.call(join).result(timeout=600)
        with self._lock:
            self.scored[name] = wins
        if self.metrics is not None:
            self.metrics.task_scored.inc()
        logger.info("Adapter %s scored on %d tasks; it is now the best adapter of %s", name, len(scores), wins or "none")

    def _yield_to_traffic(self) -> None:
        sched, start = self.engine.scheduler, time.time()
        while time.time() - start < self.max_defer_s and not self._stop.is_set():
            if not sched.running and not sched.waiting:
                return
            time.sleep(0.02)

    def _gauge(self) -> None:
        if self.metrics is not None:
            with self._lock:
                pending = len(self.queued) + (1 if self.current else 0)
            self.metrics.task_scoring_queue.set(pending)
