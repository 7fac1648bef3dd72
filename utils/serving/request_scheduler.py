"""Stage: the server's request scheduler for the local engine. Batch forming, and rows joining and leaving per step.

The queue, routing and events are :mod:`utils.serving.scheduling`'s (shared with the vLLM engine's scheduler).
One background thread owns the model. Its loop:

1. Waiting requests whose adapters are not known yet are resolved together: the ``auto`` ones, embedded ahead on
   the queue's embedding thread while the batch decodes, are searched in the FAISS index in one call (batched
   retrieval); named adapters and explicit mixes are looked up in the pool.
2. Requests are admitted into the running batch, up to ``max_batch_size`` rows. The admitted ones join the next
   decoding step: their prompts are prefilled in the same forward as the running rows' tokens, packed without
   padding (:meth:`BatchDecoder.step` with ``joining``, a mixed step). Requests that keep their prompt's logprobs
   (and all of them with ``--prefill separate``) are prefilled before the step, in groups of similar length
   (:meth:`BatchDecoder.add`). A prompt longer than the decoder's ``max_prefill_tokens`` is prefilled over several
   steps; its request counts as running meanwhile. Admission depends on the policy:

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

A failure while prefilling fails the requests being prefilled; a failure in a decoding step fails the rows of that
step and the requests joining it (those alone when their adapters could not be composed). Either way the error goes
to those requests (status 500) and the loop goes on serving.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

from utils.decoding import BatchDecoder, JoinFailed
from utils.routing import Router
from utils.serving.scheduling import Job, RequestQueue

logger = logging.getLogger(__name__)

POLICIES = ("continuous", "dynamic", "same_adapters")


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
        embed_ahead: as :class:`utils.serving.scheduling.RequestQueue` (the server turns it off when the model decodes
            on the CPU: ``--embed_ahead``).
    """

    def __init__(self, decoder: BatchDecoder, pool=None, router: Router | None = None, metrics=None,
                 max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256, policy: str = "continuous",
                 prefill_padding: float = 1.25, prompt_logprob_positions: int = 1024, embed_ahead: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"Unknown batching policy {policy!r}; use one of {', '.join(POLICIES)}.")
        self.q = RequestQueue(pool, router, metrics, max_batch_size, max_wait_ms, max_queue, embed_ahead)
        self.decoder = decoder
        self.policy = policy
        self.prefill_padding = prefill_padding
        self.prompt_logprob_positions = prompt_logprob_positions
        self.max_rows_seen = 0  # the largest batch a decoding step has run (for tests and logs)
        self.steps = 0
        self.steps_with_joins = 0  # steps that prefilled joining requests in their forward (mixed steps)
        self.joining: list[Job] = []  # admitted requests that join the next step (a mixed step)

    # -- what the HTTP layer and the pool routes use -----------------------------------------------------------
    def start(self) -> None:
        self.q.start(self._run)

    def stop(self, timeout: float | None = 30.0) -> None:
        self.q.stop(timeout)

    def __getattr__(self, name: str):
        """The queue's (:class:`RequestQueue`): ``submit``, ``call``, ``cancel``, ``alive``, ``running``, ``waiting``,
        and what it was built with: ``pool``, ``router``, ``metrics``, ``max_batch_size``."""
        if name == "q":
            raise AttributeError(name)
        return getattr(self.q, name)

    def stats(self) -> dict:
        return self.q.stats(self.max_rows_seen, self.steps, self.policy)

    # -- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with self.decoder.composition.active() if self.decoder.composition is not None else nullcontext():
            self._loop()

    def _loop(self) -> None:
        q = self.q
        try:
            while True:
                with q.cond:
                    while not q.ready() and not q.running and not q.stopping and not q.control:
                        q.cond.wait()  # (a request still being embedded ahead is not ready)
                    if q.stopping and not q.waiting and not q.running and not q.control:
                        return
                    gone = q.gather_waiting()
                for job in gone:
                    q.unhold(job)
                q.run_control()
                self._drop([j for j in q.running if j.cancelled])
                self._admit()
                if q.running or self.joining:
                    self._step()
                q.gauge()
        except Exception:  # a bug in the loop itself: fail everyone rather than hang their requests
            logger.exception("Scheduler loop failed")
            q.fail_all("The scheduler failed; see the server log.")

    def _admit(self) -> None:
        q = self.q
        if not q.resolve_waiting():
            return
        room = self.max_batch_size - len(q.running)
        if room <= 0 or (self.policy == "dynamic" and q.running):
            return
        with q.cond:
            candidates = [j for j in q.waiting if j.seq is not None and not j.cancelled]
            if self.policy == "same_adapters":
                key = q.running[0].batch_key() if q.running else (candidates[0].batch_key() if candidates else None)
                candidates = [j for j in candidates if j.batch_key() == key]
            admitted = self._fitting(candidates, room)
            for job in admitted:
                q.waiting.remove(job)
        if self.pool is not None:  # read ahead the adapters of those still waiting, while this step runs
            self.pool.prefetch([n for j in candidates if j not in admitted for n in j.adapter_names])
        if not admitted:
            return
        admitted = self._loaded(admitted)
        now = time.perf_counter()
        for job in admitted:
            q.admitted(job, now)
        if self.decoder.mixed_steps:  # they join the next step's forward (or, with none running, one prefill), unpadded
            self.joining = [j for j in admitted if j.prompt_logprobs is None]
            admitted = [j for j in admitted if j.prompt_logprobs is not None]
        self._prefill(admitted)

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` apart from a decoding step and add them to the running batch."""
        q = self.q
        # Prefill in groups of similar length: a left-padded prefill computes every padding position, and a random
        # mix of prompts padded to the longest one costs about twice its real tokens (bench/bench_serve.py rows).
        for group in self._prefill_groups(jobs):
            try:
                self.decoder.add([j.seq for j in group])
            except Exception as err:
                logger.exception("Prefill of %d requests failed", len(group))
                if self.decoder.composition is not None:  # their factors were built before the failing forward
                    self.decoder.composition.forget([j.seq.serial for j in group])
                # a failure after the merge leaves the running batch inconsistent: it fails with the group
                self._fail_batch(group, err, with_running=any(j.seq in self.decoder.rows for j in group))
                continue
            q.running.extend(group)
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
                self.q.fail(job, 500, f"An adapter of this request cannot be read: {err}")
                continue
            ok.append(job)
        return ok

    def _step(self) -> None:
        joining, self.joining = self.joining, []
        n = len(self.q.running) + len(joining)
        self.max_rows_seen = max(self.max_rows_seen, n)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
        try:
            self.decoder.step([j.seq for j in joining])
        except JoinFailed as err:  # the joining requests' adapters could not be composed: they fail alone
            logger.error("Requests joining a step failed: %s", err)
            self._fail_batch(joining, err.__cause__ or err)
            if self.q.running:
                self._step()
            return
        except Exception as err:
            logger.exception("Decoding step of %d rows failed", n)
            self._fail_batch(joining, err, with_running=True)
            return
        if joining:
            self.steps_with_joins += 1
            self.q.running.extend(joining)
        known = {id(s) for s in self.decoder.rows} | {id(s) for s in self.decoder.prefilling}
        lost = [j for j in self.q.running if id(j.seq) not in known]
        if lost:  # a request the decoder no longer holds would wait for ever: it fails instead (a bug, if it happens)
            logger.error("%d running requests are not in the decoder's batch; they fail", len(lost))
            self.q.running = [j for j in self.q.running if id(j.seq) in known]
            self.decoder.drop([j.seq for j in lost])  # their factors and pinned adapters
            self._fail_batch(lost, RuntimeError("the request left the decoder's batch unfinished"))
        self._emit_progress(self.q.running)

    def _emit_progress(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        finished = []
        for job in jobs:
            seq = job.seq
            if seq.generated or seq.finished:
                self.q.first_token(job, now)
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
            self.q.finish(job, now)
        self._drop(finished)

    def _drop(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.decoder.drop([j.seq for j in jobs])
        gone = {id(j) for j in jobs}
        self.q.running = [j for j in self.q.running if id(j) not in gone]
        for job in jobs:
            self.q.unhold(job)

    def _fail_batch(self, jobs: list[Job], err: Exception, with_running: bool = False) -> None:
        """Fail ``jobs`` with a 500; ``with_running``: the running batch too, and the decoder starts afresh."""
        if with_running:
            jobs = jobs + self.q.running
            self.q.running = []
            self.decoder.reset()
        for job in jobs:
            self.q.fail(job, 500, f"Generation failed for this batch: {type(err).__name__}: {err}")
