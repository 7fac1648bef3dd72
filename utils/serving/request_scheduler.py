"""Stage: the server's request scheduler. A bounded queue, batch forming, and rows joining and leaving per step.

One background thread owns the model. Its loop:

1. Waiting requests whose adapters are not known yet are resolved together: the ``auto`` ones are embedded in
   one call and searched in the FAISS index (batched retrieval); named adapters and explicit mixes are looked
   up in the pool.
2. Requests are admitted into the running batch, up to ``max_batch_size`` rows, and prefilled together
   (:meth:`BatchDecoder.add`). Admission depends on the policy:

   - ``continuous`` (default): a request joins the running batch at the next step, whatever its adapters; a
     finished row leaves at once, so a short request never waits for a long one to finish.
   - ``dynamic``: a batch is formed only when none is running and then runs until its last row finishes.
   - ``same_adapters``: like continuous, but a batch holds only requests with identical adapters and weights,
     which is all a one-adapter-per-request server can batch (kept for the benchmark).

   When nothing runs, the first request waits up to ``max_wait_ms`` for others to arrive, so that requests
   sent together are prefilled together.
   A batch never uses more distinct adapters than the pool's device tier holds (``--max_loras``): a request whose
   adapters would not fit waits, and after one has waited, later requests join only with adapters already in use,
   so the waiting one is next when rows finish. Adapters of routed requests still waiting are read ahead into the
   host tier on a background thread (:meth:`AdapterPool.prefetch`) while the step runs.
3. One decoding step for every row; new text is handed to each request's ``emit`` callback; finished and
   cancelled rows leave the batch.
4. Changes of the pool (:meth:`Scheduler.call`: runtime loads and unloads) run on this thread between steps, so
   routing, composition and the pool never see a change half-made. A request keeps the adapters it was routed to
   (:meth:`AdapterPool.hold`) until it leaves, even if one of them is unloaded meanwhile.

A failure while prefilling fails the requests being prefilled; a failure in a decoding step fails the rows
of that step. Either way the error goes to those requests (status 500) and the loop goes on serving.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

from utils.routing import Route, Router
from utils.serving.batch_decoding import BatchDecoder, Sampling, Sequence

logger = logging.getLogger(__name__)

POLICIES = ("continuous", "dynamic", "same_adapters")


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
    t_admitted: float | None = None
    t_first: float | None = None
    sent: int = 0  # characters of text emitted
    tokens_sent: int = 0  # generated tokens emitted

    def batch_key(self):
        s = self.seq
        return (tuple(s.adapters), tuple(round(w, 6) for w in s.adapter_w), s.mode)


def length_groups(jobs: list[Job], max_padding: float = 1.25) -> list[list[Job]]:
    """``jobs`` sorted by prompt length and cut into groups whose padded size (rows x longest prompt) stays within
    ``max_padding`` times their real prompt tokens."""
    ordered = sorted(jobs, key=lambda j: len(j.prompt_ids))
    groups: list[list[Job]] = []
    for job in ordered:
        if groups:
            g = groups[-1]
            n = len(job.prompt_ids)  # the longest so far, as jobs come sorted
            if n * (len(g) + 1) <= max_padding * (sum(len(x.prompt_ids) for x in g) + n):
                g.append(job)
                continue
        groups.append([job])
    return groups


class Scheduler:
    """Runs :class:`Job` objects on a :class:`BatchDecoder` from one background thread (module docstring).

    Args:
        decoder: the running batch.
        pool: the :class:`AdapterPool` (None: base model only).
        router: the :class:`utils.routing.Router` over the pool, which answers each request's route.
        metrics: a :class:`ServerMetrics` or None.
    """

    def __init__(self, decoder: BatchDecoder, pool=None, router: Router | None = None, metrics=None,
                 max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256, policy: str = "continuous",
                 prefill_padding: float = 1.25, prompt_logprob_positions: int = 1024):
        if policy not in POLICIES:
            raise ValueError(f"Unknown batching policy {policy!r}; use one of {', '.join(POLICIES)}.")
        self.decoder = decoder
        self.pool = pool
        self.router = router or Router([])
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.policy = policy
        self.prefill_padding = prefill_padding
        self.prompt_logprob_positions = prompt_logprob_positions
        self.waiting: collections.deque[Job] = collections.deque()
        self._control: collections.deque[tuple[Callable, Future]] = collections.deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.max_rows_seen = 0  # the largest batch a decoding step has run (for tests and logs)
        self.steps = 0

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lora-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish what is waiting and running, then end the thread."""
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``max_queue`` requests are waiting."""
        with self.cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max_queue {self.max_queue})")
            self.waiting.append(job)
            self._gauge()
            self.cond.notify_all()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the scheduler thread between two steps; the future gets its result or exception.

        A scheduler whose thread is not running runs ``fn`` at once on the caller's thread.
        """
        fut: Future = Future()
        with self.cond:
            if self.alive and not self._stop:
                self._control.append((fn, fut))
                self.cond.notify_all()
                return fut
        try:
            fut.set_result(fn())
        except Exception as err:  # handed to the caller through the future
            fut.set_exception(err)
        return fut

    def _run_control(self) -> None:
        while True:
            with self.cond:
                if not self._control:
                    return
                fn, fut = self._control.popleft()
            try:
                fut.set_result(fn())
            except Exception as err:  # handed to the caller through the future
                fut.set_exception(err)

    def cancel(self, job: Job) -> None:
        """Mark ``job`` cancelled (its client went away); it leaves the queue or batch at the next step."""
        job.cancelled = True
        with self.cond:
            self.cond.notify_all()

    # -- the loop ------------------------------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.running.set(len(self.running))

    def _run(self) -> None:
        with self.decoder.composition.active() if self.decoder.composition is not None else nullcontext():
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.waiting and not self.running and not self._stop and not self._control:
                        self.cond.wait()
                    if self._stop and not self.waiting and not self.running and not self._control:
                        return
                    gone = self._gather_waiting()
                for job in gone:
                    self._unhold(job)
                self._run_control()
                self._drop([j for j in self.running if j.cancelled])
                self._admit()
                if self.running:
                    self._step()
                self._gauge()
        except Exception:  # a bug in the loop itself: fail everyone rather than hang their requests
            logger.exception("Scheduler loop failed")
            with self.cond:
                jobs = list(self.waiting) + self.running
                self.waiting.clear()
                self.running = []
                self._stop = True
            for job in jobs:
                self._fail(job, 500, "The scheduler failed; see the server log.")
            with self.cond:
                control = list(self._control)
                self._control.clear()
            for _, fut in control:
                fut.set_exception(RuntimeError("The scheduler failed; see the server log."))

    def _gather_waiting(self) -> list[Job]:
        """With ``cond`` held: when nothing runs, let the first waiting request wait up to ``max_wait_ms`` for others to
        arrive (so that requests sent together are routed and prefilled together); then take the cancelled ones out of
        the queue and return them."""
        if (not self.running and self.waiting and len(self.waiting) < self.max_batch_size and not self._stop
                and not self._control):
            deadline = self.waiting[0].t_arrival + self.max_wait_s
            while (len(self.waiting) < self.max_batch_size and time.perf_counter() < deadline and not self._stop
                   and not self._control):
                self.cond.wait(max(deadline - time.perf_counter(), 0.0))
        gone = [j for j in self.waiting if j.cancelled]
        for job in gone:
            self.waiting.remove(job)
        return gone

    def _admit(self) -> None:
        with self.cond:
            pending = list(self.waiting)
        if not pending:
            return
        self._resolve([j for j in pending if j.seq is None])
        room = self.max_batch_size - len(self.running)
        if room <= 0 or (self.policy == "dynamic" and self.running):
            return
        with self.cond:
            candidates = [j for j in self.waiting if j.seq is not None and not j.cancelled]
            if self.policy == "same_adapters":
                key = self.running[0].batch_key() if self.running else (candidates[0].batch_key() if candidates else None)
                candidates = [j for j in candidates if j.batch_key() == key]
            admitted = self._fitting(candidates, room)
            for job in admitted:
                self.waiting.remove(job)
        if self.pool is not None:  # read ahead the adapters of those still waiting, while this step runs
            self.pool.prefetch([n for j in candidates if j not in admitted for n in j.adapter_names])
        if not admitted:
            return
        admitted = self._loaded(admitted)
        now = time.perf_counter()
        for job in admitted:
            job.t_admitted = now
            if self.metrics is not None:
                self.metrics.queue_time.observe(now - job.t_arrival)
                self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        # Prefill in groups of similar length: a left-padded prefill computes every padding position, and a random
        # mix of prompts padded to the longest one costs about twice its real tokens (bench/bench_serve.py rows).
        for group in self._prefill_groups(admitted):
            try:
                self.decoder.add([j.seq for j in group])
            except Exception as err:
                logger.exception("Prefill of %d requests failed", len(group))
                if self.decoder.composition is not None:  # their factors were built before the failing forward
                    self.decoder.composition.forget([j.seq.serial for j in group])
                # a failure after the merge leaves the running batch inconsistent: it fails with the group
                self._fail_batch(group, err, with_running=any(j.seq in self.decoder.rows for j in group))
                continue
            self.running.extend(group)
            self._emit_progress(group)

    def _prefill_groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Groups prefilled together: similar lengths (:func:`length_groups`); rows that keep every position's logits
        (prompt logprobs) in groups of at most ``prompt_logprob_positions`` positions."""
        scoring = [j for j in jobs if j.prompt_logprobs is not None]
        groups = length_groups([j for j in jobs if j.prompt_logprobs is None], self.prefill_padding)
        for g in length_groups(scoring, self.prefill_padding):
            part: list[Job] = []
            for job in g:  # sorted by length: the last one is the longest
                if part and len(job.prompt_ids) * (len(part) + 1) > self.prompt_logprob_positions:
                    groups.append(part)
                    part = []
                part.append(job)
            if part:
                groups.append(part)
        return groups

    def _fitting(self, candidates: list[Job], room: int) -> list[Job]:
        """The candidates, in order, that join the batch: at most ``room``, with the adapters of the running rows and
        of those admitted within ``max_loras``. After one has to wait, only requests needing no new adapter join."""
        if self.pool is None:
            return candidates[:room]
        in_use = self.pool.pinned()
        admitted, blocked = [], False
        for job in candidates:
            if len(admitted) >= room:
                break
            need = set(job.adapter_names) - in_use
            if need and (blocked or len(in_use) + len(need) > self.pool.max_loras):
                blocked = True
                continue
            admitted.append(job)
            in_use |= need
        return admitted

    def _loaded(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` whose adapters are read into the host tier; one that cannot be read fails alone (500)."""
        if self.pool is None:
            return jobs
        ok = []
        for job in jobs:
            try:
                self.pool.load(job.adapter_names)
            except Exception as err:
                logger.error("Request failed: %s", err)
                self._fail(job, 500, f"An adapter of this request cannot be read: {err}")
                continue
            ok.append(job)
        return ok

    def _step(self) -> None:
        n = len(self.running)
        self.max_rows_seen = max(self.max_rows_seen, n)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
        try:
            self.decoder.step()
        except Exception as err:
            logger.exception("Decoding step of %d rows failed", n)
            self._fail_batch([], err, with_running=True)
            return
        self._emit_progress(self.running)

    def _emit_progress(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        finished = []
        for job in jobs:
            seq = job.seq
            if job.t_first is None and (seq.generated or seq.finished):
                job.t_first = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - job.t_arrival)
            text = seq.stable_text()
            n = len(seq.generated)
            if n > job.tokens_sent or len(text) > job.sent:  # one delta per step, so one per generated token
                delta = {"text": text[job.sent:], "token_ids": seq.generated[job.tokens_sent:n]}
                if seq.logprobs is not None:
                    delta["token_logprobs"] = seq.token_logprobs[job.tokens_sent:n]
                    delta["top_logprobs"] = seq.top_logprobs[job.tokens_sent:n]
                job.emit("delta", delta)
                job.sent, job.tokens_sent = len(text), n
            if seq.finished:
                finished.append(job)
        for job in finished:
            completion = len(job.seq.generated)
            if self.metrics is not None:
                self.metrics.generation_tokens.inc(completion)
                self.metrics.latency.observe(now - job.t_arrival)
            job.emit("done", {
                "finish_reason": job.seq.finish_reason,
                "usage": {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion,
                          "total_tokens": len(job.prompt_ids) + completion},
                "timings": self._timings(job, now),
                "seq": job.seq,  # its tokens and logprobs (not changed after this)
            })
        self._drop(finished)

    def _drop(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.decoder.drop([j.seq for j in jobs])
        gone = {id(j) for j in jobs}
        self.running = [j for j in self.running if id(j) not in gone]
        for job in jobs:
            self._unhold(job)

    def _unhold(self, job: Job) -> None:
        if job.held and self.pool is not None:
            self.pool.unhold(job.adapter_names)
        job.held = False

    @staticmethod
    def _timings(job: Job, now: float) -> dict:
        ms = lambda t: None if t is None else round((t - job.t_arrival) * 1000.0, 2)  # noqa: E731
        total_s = now - job.t_arrival
        decode_s = now - job.t_first if job.t_first is not None else 0.0
        n = len(job.seq.generated) if job.seq is not None else 0
        return {"retrieval_ms": round(job.retrieval_s * 1000.0, 2), "queue_ms": ms(job.t_admitted),
                "ttft_ms": ms(job.t_first), "total_ms": round(total_s * 1000.0, 2),
                "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None}

    def _fail(self, job: Job, status: int, message: str) -> None:
        self._unhold(job)
        job.emit("error", {"status": status, "message": message})

    def _fail_batch(self, jobs: list[Job], err: Exception, with_running: bool = False) -> None:
        """Fail ``jobs`` with a 500; ``with_running``: the running batch too, and the decoder starts afresh."""
        if with_running:
            jobs = jobs + self.running
            self.running = []
            self.decoder.reset()
        for job in jobs:
            self._fail(job, 500, f"Generation failed for this batch: {type(err).__name__}: {err}")

    # -- adapters of each request --------------------------------------------------------------------------
    def _resolve(self, jobs: list[Job]) -> None:
        """Give each job its adapters, weights and :class:`Sequence`: one router call for all of them."""
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            routing = self.router.route([j.query for j in jobs], [j.route for j in jobs])
        except Exception as err:
            logger.exception("Retrieval failed")
            for job in jobs:
                self._remove_waiting(job)
                self._fail(job, 500, f"Retrieval failed: {type(err).__name__}: {err}")
            return
        domains = self.router.domain_of
        retrieval_s = routing.meta.get("retrieval_s")
        if retrieval_s is not None and self.metrics is not None:
            self.metrics.retrieval.observe(time.perf_counter() - t0)
        for i, job in enumerate(jobs):
            if job.route.method == "auto":
                job.retrieval_s = retrieval_s or 0.0
            missing = [n for n in routing.adapters[i] if self.pool is None or n not in self.pool.index]
            if missing:
                self._remove_waiting(job)
                self._fail(job, 404, f"Adapter {missing[0]!r} is no longer in the pool (it was unloaded); GET /v1/models lists the adapters.")
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

    def _remove_waiting(self, job: Job) -> None:
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)

    def stats(self) -> dict:
        out = {"waiting": len(self.waiting), "running": len(self.running), "max_batch_seen": self.max_rows_seen,
               "steps": self.steps, "policy": self.policy}
        if self.pool is not None:
            out["pool"] = self.pool.describe()
        return out
