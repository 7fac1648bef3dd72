"""Stage: the server's scheduler when vLLM generates (``serve.py --engine vllm``).

The same queue, routing and events as the local engine's scheduler (:mod:`utils.serving.scheduling`), and no
model: one thread routes the waiting requests together (one embedding call, one FAISS search) and hands each to a
worker, which gets its composition registered with vLLM (:class:`utils.vllm_compositions.ComposedAdapters`) and streams its tokens
from vLLM's ``/v1/completions`` back as ``delta`` events. vLLM batches the requests in flight (up to
``--max_batch_size`` of them; vLLM's own ``--max-num-seqs`` and ``--max-loras`` bound its batch).

The prompt goes to vLLM as token ids (tokenised here, as for the local engine), so both engines see the same tokens.
A vLLM that is down, stalls or fails answers the request with a 503; a composition over vLLM's ``--max-lora-rank``
with a 400.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from utils.serving.scheduling import Job, RequestQueue
from utils.vllm_compositions import RankTooLarge
from utils.vllm_engine import EngineRefused, EngineUnavailable, Replicas

logger = logging.getLogger(__name__)


def _token_id(token: str) -> int:
    """vLLM's ``return_tokens_as_token_ids`` form ``token_id:123`` as 123."""
    return int(token.rsplit(":", 1)[1])


class VllmScheduler:
    """Runs :class:`Job` objects on a vLLM server (module docstring).

    Args:
        replicas: the vLLM server(s) (:class:`utils.vllm_engine.Replicas`).
        eos_ids: token ids that end generation (vLLM returns the EOS token; without logprobs it is not reported, as
            the local engine does not).
        pool, router, metrics, max_batch_size (requests in flight to vLLM), max_wait_ms, max_queue, embed_ahead: as
            :class:`utils.serving.scheduling.RequestQueue`.
    """

    def __init__(self, replicas: Replicas, eos_ids=(), pool=None, router=None, metrics=None, max_batch_size: int = 32,
                 max_wait_ms: float = 10.0, max_queue: int = 256, embed_ahead: bool = True):
        self.q = RequestQueue(pool, router, metrics, max_batch_size, max_wait_ms, max_queue, embed_ahead)
        self.replicas = replicas
        self.eos_ids = set(eos_ids)
        self._workers = ThreadPoolExecutor(max_workers=max_batch_size, thread_name_prefix="vllm-request")
        self.failures = 0

    # -- what the HTTP layer and the pool routes use -----------------------------------------------------------
    def start(self) -> None:
        self.q.start(self._loop)

    def stop(self, timeout: float | None = 30.0) -> None:
        self.q.stop(timeout)
        self._workers.shutdown(wait=True)
        self.replicas.close()

    def __getattr__(self, name: str):
        """The queue's (:class:`RequestQueue`): ``submit``, ``call``, ``cancel``, ``alive``, ``running``, ``waiting``,
        and what it was built with: ``pool``, ``router``, ``metrics``, ``max_batch_size``."""
        if name == "q":
            raise AttributeError(name)
        return getattr(self.q, name)

    def stats(self) -> dict:
        out = self.q.stats()
        out.update(engine="vllm", in_flight=len(self.q.running), engine_failures=self.failures, **self.replicas.describe())
        return out

    # -- the loop ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        q = self.q
        try:
            while True:
                with q.cond:
                    while not q.control and not (q.ready() and len(q.running) < self.max_batch_size) \
                            and not (q.stopping and not q.waiting):
                        q.cond.wait()
                    if q.stopping and not q.waiting and not q.control:
                        return
                    gone = q.gather_waiting()
                for job in gone:
                    q.unhold(job)
                q.run_control()
                self._admit()
                q.gauge()
        except Exception:  # a bug in the loop itself: fail those waiting rather than hang their requests
            logger.exception("Scheduler loop failed")
            q.fail_all("The scheduler failed; see the server log.", with_running=False)

    def _admit(self) -> None:
        q = self.q
        if not q.resolve_waiting():
            return
        now = time.perf_counter()
        with q.cond:
            room = self.max_batch_size - len(q.running)
            ready = [j for j in q.waiting if j.seq is not None][:max(room, 0)]
            for job in ready:
                q.waiting.remove(job)
                if not job.cancelled:
                    q.running.append(job)
        for job in ready:
            if job.cancelled:
                q.unhold(job)
                continue
            q.admitted(job, now)
            self._workers.submit(self._generate, job)

    def _finish(self, job: Job) -> None:
        q = self.q
        with q.cond:
            if job in q.running:
                q.running.remove(job)
            q.cond.notify_all()
        q.unhold(job)

    # -- one request ---------------------------------------------------------------------------------------
    def _generate(self, job: Job) -> None:
        try:
            self._stream(job)
        except RankTooLarge as err:
            job.emit("error", {"status": 400, "message": err.message, "code": "composition_rank_exceeded", "type": "invalid_request_error"})
        except EngineUnavailable as err:
            self.failures += 1
            logger.error("vLLM: %s", err.message)
            job.emit("error", {"status": 503, "message": err.message, "code": "engine_unavailable", "type": "server_error"})
        except EngineRefused as err:
            job.emit("error", {"status": err.status, "message": f"The vLLM server refused this request: {err.message}",
                               "code": "engine_refused", "type": "invalid_request_error"})
        except Exception as err:  # noqa: BLE001 - handed to the request, the server goes on
            logger.exception("Request failed")
            job.emit("error", {"status": 500, "message": f"Generation failed: {type(err).__name__}: {err}"})
        finally:
            self._finish(job)

    def _stream(self, job: Job) -> None:
        seq = job.seq
        names = [a["name"] for a in job.applied or []]
        weights = [a["weight"] for a in job.applied or []]
        mode = seq.mode
        replica, model = self.replicas.acquire(names, weights, mode)
        try:
            s = seq.sampling
            body = {"model": model, "prompt": job.prompt_ids, "max_tokens": job.max_new_tokens, "temperature": s.temperature,
                    "top_p": s.top_p, "ignore_eos": job.ignore_eos, "return_token_ids": True, "skip_special_tokens": True}
            if s.seed is not None:
                body["seed"] = s.seed
            if job.stop:
                body["stop"] = list(job.stop)
            if job.logprobs is not None:
                body.update(logprobs=job.logprobs, return_tokens_as_token_ids=True)
            if job.prompt_logprobs is not None:
                body.update(prompt_logprobs=job.prompt_logprobs, return_tokens_as_token_ids=True)
            for chunk in replica.client.stream("/v1/completions", body, cancelled=lambda: job.cancelled):
                for choice in chunk.get("choices", []):
                    self._take(job, choice)
            if job.cancelled:
                return
        finally:
            self.replicas.release(replica, names, model)
        if seq.finish_reason is None:
            seq.finish_reason = "length"
        self.q.finish(job, time.perf_counter())

    def _take(self, job: Job, choice: dict) -> None:
        """One streamed choice chunk of vLLM into ``job.seq`` and a ``delta`` event."""
        seq = job.seq
        if choice.get("prompt_logprobs") is not None and job.prompt_logprobs is not None:
            self._prompt_logprobs(seq, choice["prompt_logprobs"])
        ids = list(choice.get("token_ids") or [])
        lps, tops = [], []
        lp = choice.get("logprobs")
        if job.logprobs is not None and lp:
            lps = [float(x) if x is not None else None for x in lp.get("token_logprobs") or []]
            tops = [sorted(((_token_id(t), float(v)) for t, v in (top or {}).items()), key=lambda x: -x[1])[:job.logprobs]
                    for top in lp.get("top_logprobs") or []]
        finish = choice.get("finish_reason")
        if finish is not None and job.logprobs is None and ids and ids[-1] in self.eos_ids and not job.ignore_eos:
            ids = ids[:-1]  # the end-of-sequence token, which the local engine reports only with logprobs
        text = choice.get("text") or ""
        if ids or text:
            self.q.first_token(job, time.perf_counter())
            seq.generated.extend(ids)
            seq.text += text
            delta = {"text": text, "token_ids": ids}
            if job.logprobs is not None:
                seq.token_logprobs.extend(lps[:len(ids)])
                seq.top_logprobs.extend(tops[:len(ids)])
                delta.update(token_logprobs=lps[:len(ids)], top_logprobs=tops[:len(ids)])
            job.emit("delta", delta)
            job.sent, job.tokens_sent = len(seq.text), len(seq.generated)
        if finish is not None:
            seq.finish_reason = finish

    @staticmethod
    def _prompt_logprobs(seq, entries: list) -> None:
        """vLLM's ``prompt_logprobs`` (per prompt token: None or {token id: {logprob, rank, decoded_token}}) into the
        sequence's prompt logprobs, as the local engine records them."""
        token_lps, top_lps = [], []
        for t, entry in zip(seq.prompt_ids, entries):
            if entry is None:
                token_lps.append(None)
                top_lps.append(None)
                continue
            items = {int(str(k).rsplit(":", 1)[-1]): v for k, v in entry.items()}
            token_lps.append(float(items[t]["logprob"]) if t in items else None)
            ranked = sorted(((i, float(v["logprob"])) for i, v in items.items() if v.get("rank") is not None), key=lambda x: -x[1])
            top_lps.append(ranked[:seq.prompt_logprobs])
        seq.prompt_token_logprobs, seq.prompt_top_logprobs = token_lps, top_lps
