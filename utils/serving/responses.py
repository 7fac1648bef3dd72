"""Stage: the server's answers. A request's jobs become one JSON answer (:meth:`Responder.collect`) or a stream of
server-sent events (:meth:`Responder.stream`), in OpenAI's formats: choices, ``usage``, the logprob formats, and the
extra fields ``adapters``, ``composition`` and ``timings`` of every answer (and of a stream's first and last chunk).

The scheduler's events reach a request's :class:`asyncio.Queue` as ``(choice, kind, payload)``: ``meta`` (adapters and
composition), ``delta`` (new text and token ids, with their logprobs when asked), ``done`` (finish reason, usage,
timings and the :class:`utils.serving.scheduling.Output`: tokens and logprobs as plain data) or ``error``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fastapi.responses import Response

from utils.serving.openai_format import TokenText, chat_logprobs, completion_logprobs, merge_completion_logprobs
from utils.serving.protocol import APIError, error_response
from utils.serving.scheduling import Job, QueueFull


@dataclass
class Reply:
    """What the answer to one request needs: its id, its jobs (one per choice, in choice order) and their prompts."""

    rid: str
    created: int
    model: str
    chat: bool
    endpoint: str
    jobs: list
    echo_texts: list | None
    prompt_tokens: int



class Responder:
    """Queues a request's jobs and answers it, over one engine (its scheduler, tokenizer and metrics)."""

    def __init__(self, engine, retry_after_s: int = 1):
        self.engine = engine
        self.metrics = engine.metrics
        self.token_text = TokenText(engine.tokenizer, engine.tokenizer_lock)
        self.retry_after_s = retry_after_s

    def submit_all(self, queue: asyncio.Queue, makers: list) -> list[Job]:
        """Build a job per maker (``maker(emit)``; choice i's events reach ``queue`` as ``(i, kind, payload)``) and queue
        them all, or none: a full queue cancels those already queued and answers 429."""
        loop = asyncio.get_running_loop()

        def emitter(i):
            def emit(kind, payload):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, kind, payload))
                except RuntimeError:  # the event loop has closed: nobody is listening any more
                    pass
            return emit

        jobs = [make(emitter(i)) for i, make in enumerate(makers)]
        for n, job in enumerate(jobs):
            try:
                self.engine.scheduler.submit(job)
            except QueueFull as err:
                for queued in jobs[:n]:
                    self.engine.scheduler.cancel(queued)
                raise APIError(429, f"The server is busy ({err}); retry after {self.retry_after_s} s.", code="queue_full",
                               type_="rate_limit_error", headers={"Retry-After": str(self.retry_after_s)}) from err
        return jobs

    def logprobs_of(self, ctx, i: int, seq, text_start: int = 0):
        """The ``logprobs`` of choice i: prompt tokens first with echo (or ``prompt_logprobs``), then the generated ones."""
        gen = seq.logprobs is not None
        if ctx.chat:
            return chat_logprobs(self.token_text, seq.generated, seq.token_logprobs, seq.top_logprobs) if gen else None
        prompt = None
        if ctx.echo_texts is not None and seq.prompt_logprobs is not None:
            prompt = completion_logprobs(self.token_text, seq.prompt_ids, seq.prompt_token_logprobs, seq.prompt_top_logprobs)
        if not gen:
            return prompt
        start = text_start + (sum(len(t) for t in prompt["tokens"]) if prompt is not None else 0)
        return merge_completion_logprobs(prompt, completion_logprobs(self.token_text, seq.generated, seq.token_logprobs, seq.top_logprobs, start))

    def prompt_logprobs_of(self, seq):
        """vLLM's ``prompt_logprobs`` field: per prompt token {token id: {logprob, decoded_token}} (None for the first)."""
        if seq.prompt_logprobs is None:
            return None
        out = []
        for t, lp, top in zip(seq.prompt_ids, seq.prompt_token_logprobs, seq.prompt_top_logprobs):
            if lp is None:
                out.append(None)
                continue
            entry = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": self.token_text(i)} for r, (i, v) in enumerate(top)}
            entry.setdefault(str(t), {"logprob": lp, "rank": None, "decoded_token": self.token_text(t)})
            out.append(entry)
        return out

    async def collect(self, request, ctx, queue):
        k = len(ctx.jobs)
        texts, metas, dones = [[] for _ in range(k)], [{} for _ in range(k)], [None] * k
        try:
            while any(d is None for d in dones):
                try:
                    i, kind, payload = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        for job in ctx.jobs:
                            self.engine.scheduler.cancel(job)
                        return Response(status_code=499)
                    continue
                if kind == "meta":
                    metas[i] = payload
                elif kind == "delta":
                    texts[i].append(payload["text"])
                elif kind == "error":
                    for job in ctx.jobs:
                        self.engine.scheduler.cancel(job)
                    err = APIError(payload["status"], payload["message"], code=payload.get("code", "generation_failed"),
                                   type_=payload.get("type", "server_error"))
                    self.metrics.requests.labels(ctx.endpoint, str(err.status)).inc()
                    self.metrics.errors.labels(err.code).inc()
                    return error_response(err)
                elif kind == "done":
                    dones[i] = payload
        except asyncio.CancelledError:
            for job in ctx.jobs:
                self.engine.scheduler.cancel(job)
            raise
        self.metrics.requests.labels(ctx.endpoint, "200").inc()
        choices = []
        for i in range(k):
            content, seq = "".join(texts[i]), dones[i]["output"]
            if ctx.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": content}, "logprobs": self.logprobs_of(ctx, i, seq),
                          "finish_reason": dones[i]["finish_reason"]}
            else:
                echo = ctx.echo_texts[i] if ctx.echo_texts is not None else ""
                choice = {"index": i, "text": echo + content, "logprobs": self.logprobs_of(ctx, i, seq), "finish_reason": dones[i]["finish_reason"]}
                if seq.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self.prompt_logprobs_of(seq)
            if k > 1:
                choice.update(adapters=metas[i].get("adapters", []), composition=metas[i].get("composition"))
            choices.append(choice)
        completion = sum(d["usage"]["completion_tokens"] for d in dones)
        usage = {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": completion, "total_tokens": ctx.prompt_tokens + completion}
        return {"id": ctx.rid, "object": "chat.completion" if ctx.chat else "text_completion", "created": ctx.created, "model": ctx.model,
                "choices": choices, "usage": usage, "adapters": metas[0].get("adapters", []),
                "composition": metas[0].get("composition"), "timings": dones[0]["timings"]}

    async def stream(self, ctx, queue, include_usage: bool, continuous_usage: bool):
        chat = ctx.chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        k = len(ctx.jobs)
        metas, finished = [{} for _ in range(k)], [False] * k
        generated, offsets, pending = [0] * k, [0] * k, [False] * k

        def first_text(i):  # what a choice's first chunk starts with: the prompt when echoed
            return ctx.echo_texts[i] if ctx.echo_texts is not None else ""

        def routing(i):
            return {"adapters": metas[i]["adapters"], "composition": metas[i]["composition"]}

        def usage():
            n = sum(generated)
            return {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": n, "total_tokens": ctx.prompt_tokens + n}

        def chunk(i, delta_text=None, finish=None, extra=None, role=False, logprobs=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta_text or "", "logprobs": logprobs, "finish_reason": finish}
            body = {"id": ctx.rid, "object": obj, "created": ctx.created, "model": ctx.model, "choices": [choice]}
            if extra:
                body.update(extra)
            if continuous_usage:
                body["usage"] = usage()
            return f"data: {json.dumps(body)}\n\n"

        try:
            while not all(finished):
                i, kind, payload = await queue.get()
                if kind == "meta":
                    # Held until the first token: a stream's first chunk is what clients time as the first token
                    # (vLLM's benchmark client, guidellm), so it carries the routing with the first token's text.
                    metas[i] = payload
                    pending[i] = True
                    offsets[i] = len(first_text(i))
                elif kind == "delta":
                    generated[i] += len(payload["token_ids"])
                    lp = None
                    if "token_logprobs" in payload:
                        ids, lps, tops = payload["token_ids"], payload["token_logprobs"], payload["top_logprobs"]
                        lp = (chat_logprobs(self.token_text, ids, lps, tops) if chat
                              else completion_logprobs(self.token_text, ids, lps, tops, offsets[i]))
                        offsets[i] += sum(len(self.token_text(t)) for t in ids)
                    if pending[i]:
                        pending[i] = False
                        yield chunk(i, first_text(i) + payload["text"], logprobs=lp, extra=routing(i), role=True)
                    else:
                        yield chunk(i, payload["text"], logprobs=lp)
                elif kind == "error":
                    for job in ctx.jobs:
                        self.engine.scheduler.cancel(job)
                    self.metrics.requests.labels(ctx.endpoint, str(payload["status"])).inc()
                    code = payload.get("code", "generation_failed")
                    self.metrics.errors.labels(code).inc()
                    finished = [True] * k
                    err = {"message": payload["message"], "type": payload.get("type", "server_error"), "param": None, "code": code}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "done":
                    if pending[i]:  # nothing was generated (max_tokens 0, or the end of text at once)
                        pending[i] = False
                        yield chunk(i, first_text(i), extra=routing(i), role=True)
                    finished[i] = True
                    generated[i] = payload["usage"]["completion_tokens"]
                    extra = {"adapters": metas[i].get("adapters", []), "composition": metas[i].get("composition"), "timings": payload["timings"]}
                    seq = payload["output"]
                    if ctx.echo_texts is not None and seq.prompt_logprobs is not None and seq.logprobs is not None:
                        extra["prompt_logprobs"] = self.prompt_logprobs_of(seq)
                    yield chunk(i, None if chat else "", finish=payload["finish_reason"], extra=extra)
            self.metrics.requests.labels(ctx.endpoint, "200").inc()
            if include_usage:
                body = {"id": ctx.rid, "object": obj, "created": ctx.created, "model": ctx.model, "choices": [], "usage": usage()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not all(finished):  # the client went away mid-stream: the rows leave their batch at the next step
                for job in ctx.jobs:
                    self.engine.scheduler.cancel(job)
