"""Stage: what the server's two schedulers share. The bounded queue of requests, and everything about a request
that does not depend on how it is generated:

- :meth:`RequestQueue.submit` (429 past ``max_queue``), :meth:`RequestQueue.cancel`, and :meth:`RequestQueue.call`:
  a pool change run on the scheduler thread between two steps;
- :meth:`RequestQueue.gather_waiting`: when nothing runs, the first request waits up to ``max_wait_ms`` for others
  to arrive, so that requests sent together are routed (and prefilled) together;
- embedding ahead (``embed_ahead``): a request that retrieval or task routing will embed is embedded on a thread of
  its own as soon as it arrives (the requests that arrive meanwhile together, in one call), so the decoding thread
  never waits for the sentence embedder; a request is routed once its embedding is there. Worth it where the two
  threads do not share the cores (decoding on a GPU, or on vLLM's side); on a CPU that decodes, the step slows by
  more than the embedding costs on the decoding thread, and the server embeds there (``--embed_ahead``);
- the thread that starts the queue (the one that loaded the model) releases its OpenMP workers, and the embedding
  thread releases its own after each call, so that the decoding thread keeps the process's only OpenMP pool
  (:mod:`utils.cpu_threads`: a second pool costs a 2-core step about half its time again);
- :meth:`RequestQueue.resolve`: one router call for every waiting request (one FAISS search), each job given its
  adapters, held in the pool until it leaves, and its ``meta`` event;
- the ``done`` event (:meth:`RequestQueue.finish`) with plain data (:class:`Output`), failures, timings and metrics.

The local engine's batch loop (:class:`utils.serving.request_scheduler.Scheduler`) and the vLLM engine's worker
threads (:class:`utils.serving.vllm_scheduler.VllmScheduler`) each hold one :class:`RequestQueue`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from utils.cpu_threads import release_openmp_pool
from utils.routing import Route, Router
from utils.decoding import Sampling, Sequence

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests; the client should retry later."""


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it (the HTTP layer has validated every field).

    ``route`` is what the request asks of the router (:class:`utils.routing.Route`: ``auto`` retrieval for ``query``,
    ``base``, or an explicit ``mix``; one adapter by name is a mix of one with weight 1).
    ``emit(kind, payload)`` receives ``("meta", {...})`` once the adapters are known, ``("delta", {"text"})``
    as text is generated, then ``("done", {...})`` or ``("error", {"status", "message"})``. It is called from
    the scheduler thread and must be thread-safe.
    """

    prompt_ids: list[int]
    query: str
    max_new_tokens: int
    emit: Callable[[str, dict], None]
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    route: Route = field(default_factory=Route)
    ignore_eos: bool = False
    logprobs: int | None = None  # Sequence.logprobs
    prompt_logprobs: int | None = None  # Sequence.prompt_logprobs
    t_arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # set by the scheduler
    seq: Sequence | None = None
    adapter_names: tuple[str, ...] = ()  # the adapters it was routed to (held in the pool until it leaves)
    held: bool = False
    applied: list[dict] | None = None
    label: str = ""
    retrieval_s: float = 0.0
    embedding: object = None  # the query's embedding [d], computed ahead (RequestQueue's embedding thread)
    embed_s: float = 0.0  # the embedding call's time
    embedding_pending: bool = False  # queued for the embedding thread: not routed until it is done
    t_admitted: float | None = None
    t_first: float | None = None
    sent: int = 0  # characters of text emitted
    tokens_sent: int = 0  # generated tokens emitted

    def batch_key(self):
        s = self.seq
        return (tuple(s.adapters), tuple(round(w, 6) for w in s.adapter_w), s.mode)


@dataclass(frozen=True)
class Output:
    """A finished request's tokens and logprobs, as plain data (what the ``done`` event carries to the HTTP layer)."""

    prompt_ids: list
    generated: list
    logprobs: int | None
    token_logprobs: list
    top_logprobs: list
    prompt_logprobs: int | None
    prompt_token_logprobs: list
    prompt_top_logprobs: list

    @classmethod
    def of(cls, seq: Sequence) -> "Output":
        return cls(list(seq.prompt_ids), list(seq.generated), seq.logprobs, list(seq.token_logprobs), list(seq.top_logprobs),
                   seq.prompt_logprobs, list(seq.prompt_token_logprobs), list(seq.prompt_top_logprobs))


class RequestQueue:
    """The queue and the per-request work both schedulers share (module docstring).

    Args:
        pool: the :class:`AdapterPool` (None: base model only).
        router: the :class:`utils.routing.Router` over the pool, which answers each request's route.
        metrics: a :class:`ServerMetrics` or None.
        max_batch_size: rows (requests in flight) at most.  max_wait_ms: how long a first request waits for others.
        max_queue: waiting requests at most; more get :class:`QueueFull`.
        embed_ahead: embed the queries of retrieval and task routing on a thread of their own as they arrive (False:
            on the scheduler's thread, when they are routed).
    """

    def __init__(self, pool=None, router: Router | None = None, metrics=None, max_batch_size: int = 32, max_wait_ms: float = 10.0,
                 max_queue: int = 256, embed_ahead: bool = True):
        self.pool = pool
        self.router = router or Router([])
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.control: collections.deque[tuple[Callable, Future]] = collections.deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self._thread: threading.Thread | None = None
        self.embed_ahead = embed_ahead
        self._to_embed: collections.deque[Job] = collections.deque()  # under ``cond``, like the queue
        self._embed_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, target: Callable[[], None]) -> None:
        # The calling thread (the one that loaded the model) hands the computing over: its OpenMP workers would
        # otherwise stay and slow every operator of the scheduler's thread (utils/cpu_threads.py).
        release_openmp_pool()
        self._thread = threading.Thread(target=target, name="lora-scheduler", daemon=True)
        self._thread.start()
        if self.embed_ahead:
            self._embed_thread = threading.Thread(target=self._embed_loop, name="lora-embedder", daemon=True)
            self._embed_thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish what is waiting and running, then end the threads."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._embed_thread is not None:
            self._embed_thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``max_queue`` requests are waiting."""
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max_queue {self.max_queue})")
            ahead = self._embed_thread is not None and self.router.embeds(job.route) and self.router.embedder is not None
            job.embedding_pending = ahead
            self.waiting.append(job)
            if ahead:
                self._to_embed.append(job)
            self.gauge()
            self.cond.notify_all()

    def _embed_loop(self) -> None:
        """The embedding thread: embeds every query queued since its last call in one call, then lets them be routed.
        A failure leaves the embeddings to :meth:`resolve` (which embeds them again, and reports the error there)."""
        while True:
            with self.cond:
                while not self._to_embed and not self.stopping:
                    self.cond.wait()
                if not self._to_embed:
                    return
                jobs = list(self._to_embed)
                self._to_embed.clear()
            todo = [j for j in jobs if not j.cancelled]
            try:
                if todo:
                    t0 = time.perf_counter()
                    embeddings = self.router.embed([j.query for j in todo])
                    seconds = time.perf_counter() - t0
                    for job, e in zip(todo, embeddings):
                        job.embedding, job.embed_s = e, seconds
            except Exception as err:  # the scheduler embeds them again and reports the error to each request
                logger.warning("Embedding %d queries ahead failed (%s: %s); they are embedded when routed", len(todo),
                               type(err).__name__, err)
            release_openmp_pool()  # the scheduler's thread keeps the only pool while this one waits
            with self.cond:
                for job in jobs:
                    job.embedding_pending = False
                self.cond.notify_all()

    def ready(self) -> bool:
        """With ``cond`` held: whether a waiting request can be routed or admitted now (not waiting for its embedding)."""
        return any(not j.embedding_pending for j in self.waiting)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the scheduler thread between two steps; the future gets its result or exception.

        A scheduler whose thread is not running runs ``fn`` at once on the caller's thread.
        """
        fut: Future = Future()
        with self.cond:
            if self.alive and not self.stopping:
                self.control.append((fn, fut))
                self.cond.notify_all()
                return fut
        try:
            fut.set_result(fn())
        except Exception as err:  # handed to the caller through the future
            fut.set_exception(err)
        return fut

    def run_control(self) -> None:
        while True:
            with self.cond:
                if not self.control:
                    return
                fn, fut = self.control.popleft()
            try:
                fut.set_result(fn())
            except Exception as err:  # handed to the caller through the future
                fut.set_exception(err)

    def cancel(self, job: Job) -> None:
        """Mark ``job`` cancelled (its client went away); it leaves the queue or batch at the next step."""
        job.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.running.set(len(self.running))

    def gather_waiting(self) -> list[Job]:
        """With ``cond`` held: when nothing runs, let the first waiting request wait up to ``max_wait_ms`` for others to
        arrive (so that requests sent together are routed and prefilled together); then take the cancelled ones out of
        the queue and return them."""
        if (not self.running and self.waiting and len(self.waiting) < self.max_batch_size and not self.stopping
                and not self.control):
            deadline = self.waiting[0].t_arrival + self.max_wait_s
            while (len(self.waiting) < self.max_batch_size and time.perf_counter() < deadline and not self.stopping
                   and not self.control):
                self.cond.wait(max(deadline - time.perf_counter(), 0.0))
        gone = [j for j in self.waiting if j.cancelled]
        for job in gone:
            self.waiting.remove(job)
        return gone

    def resolve(self, jobs: list[Job]) -> None:
        """Give each job its adapters, weights and :class:`Sequence`: one router call for all of them."""
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            routing = self.router.route([j.query for j in jobs], [j.route for j in jobs], [j.embedding for j in jobs])
        except Exception as err:
            logger.exception("Retrieval failed")
            for job in jobs:
                self.remove_waiting(job)
                self.fail(job, 500, f"Retrieval failed: {type(err).__name__}: {err}")
            return
        domains = self.router.domain_of
        retrieval_s = routing.meta.get("retrieval_s")
        if retrieval_s is not None and self.metrics is not None:
            self.metrics.retrieval.observe(time.perf_counter() - t0)
        for i, job in enumerate(jobs):
            if job.route.method == "auto":
                job.retrieval_s = job.embed_s + (retrieval_s or 0.0)  # embedded ahead, then searched
            missing = [n for n in routing.adapters[i] if self.pool is None or n not in self.pool.index]
            if missing:
                self.remove_waiting(job)
                self.fail(job, 404, f"Adapter {missing[0]!r} is no longer in the pool (it was unloaded); GET /v1/models lists the adapters.")
                continue
            job.applied = routing.applied(i, domains)
            job.label = routing.label(i)
            job.adapter_names = tuple(dict.fromkeys(routing.adapters[i]))
            if self.pool is not None and job.adapter_names:
                self.pool.hold(job.adapter_names)
                job.held = True
            job.seq = Sequence(
                prompt_ids=job.prompt_ids, max_new_tokens=job.max_new_tokens, sampling=job.sampling, stop=job.stop,
                adapters=list(routing.adapters[i]), adapter_w=list(routing.weights[i]),
                mode="fusion" if routing.modes[i] == "fusion" and len(routing.adapters[i]) > 1 else "mixture", ignore_eos=job.ignore_eos,
                logprobs=job.logprobs, prompt_logprobs=job.prompt_logprobs)
            job.emit("meta", {"adapters": job.applied, "composition": job.label,
                              "retrieval_ms": round(job.retrieval_s * 1000.0, 2)})

    def resolve_waiting(self) -> bool:
        """Route the waiting requests that are not routed yet (:meth:`resolve`); False when none is waiting."""
        with self.cond:
            pending = list(self.waiting)
        if not pending:
            return False
        self.resolve([j for j in pending if j.seq is None and not j.embedding_pending])
        return True

    def remove_waiting(self, job: Job) -> None:
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)

    def unhold(self, job: Job) -> None:
        if job.held and self.pool is not None:
            self.pool.unhold(job.adapter_names)
        job.held = False

    @staticmethod
    def timings(job: Job, now: float) -> dict:
        ms = lambda t: None if t is None else round((t - job.t_arrival) * 1000.0, 2)  # noqa: E731
        total_s = now - job.t_arrival
        decode_s = now - job.t_first if job.t_first is not None else 0.0
        n = len(job.seq.generated) if job.seq is not None else 0
        return {"retrieval_ms": round(job.retrieval_s * 1000.0, 2), "queue_ms": ms(job.t_admitted),
                "ttft_ms": ms(job.t_first), "total_ms": round(total_s * 1000.0, 2),
                "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None}

    def fail(self, job: Job, status: int, message: str) -> None:
        self.unhold(job)
        job.emit("error", {"status": status, "message": message})

    def finish(self, job: Job, now: float) -> None:
        """``job``'s sequence is finished: its ``done`` event (finish reason, usage, timings, :class:`Output`) and metrics."""
        seq = job.seq
        completion = len(seq.generated)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(completion)
            self.metrics.latency.observe(now - job.t_arrival)
        job.emit("done", {
            "finish_reason": seq.finish_reason,
            "usage": {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion,
                      "total_tokens": len(job.prompt_ids) + completion},
            "timings": self.timings(job, now),
            "output": Output.of(seq),
        })

    def admitted(self, job: Job, now: float) -> None:
        """``job`` leaves the queue for generation now: its queue time and prompt tokens."""
        job.t_admitted = now
        if self.metrics is not None:
            self.metrics.queue_time.observe(now - job.t_arrival)
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def first_token(self, job: Job, now: float) -> None:
        if job.t_first is None:
            job.t_first = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - job.t_arrival)

    def stats(self, max_batch_seen: int = 0, steps: int = 0, policy: str = "continuous") -> dict:
        """What ``/health`` reports of the queue (the local engine adds its batch figures, the vLLM engine its servers')."""
        out = {"waiting": len(self.waiting), "running": len(self.running), "max_batch_seen": max_batch_seen, "steps": steps,
               "policy": policy}
        if self.pool is not None:
            out["pool"] = self.pool.describe()
        return out

    def fail_all(self, message: str, with_running: bool = True) -> None:
        """A bug in a scheduler loop: every waiting request (and running one, ``with_running``) and every pending pool
        change fails, and the loop stops taking requests."""
        with self.cond:
            jobs = list(self.waiting) + (self.running if with_running else [])
            self.waiting.clear()
            if with_running:
                self.running = []
            self.stopping = True
            control = list(self.control)
            self.control.clear()
        for job in jobs:
            self.fail(job, 500, message)
        for _, fut in control:
            fut.set_exception(RuntimeError(message))
