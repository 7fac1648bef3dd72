"""Stage: the server's HTTP API, OpenAI-compatible (FastAPI). Requests become scheduler jobs; answers stream back.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (the web page, ``web/index.html``), and the runtime pool routes
``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` (:mod:`utils.serving.pool_admin`).

``model`` is ``auto`` (retrieve the top-k adapters for the input and compose them), ``base`` (no adapter) or
an adapter's name (that adapter alone). Extra body fields, sent by the ``openai`` client with ``extra_body``:
``adapters`` ({name: weight}, used as given), ``composition`` (mixture | fusion), ``lora_num``, ``weighting``
(uniform | softmax), ``exclude`` ([names]), ``chat_format`` / ``prompt_format``, ``ignore_eos`` (vLLM's: always generate
``max_tokens``). Every response carries
``adapters`` ([{name, domain, similarity, weight}]), ``composition`` and ``timings``.

Every invalid request gets ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; the
message names the field and the fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Annotated, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from utils.routing import Route
from utils.serving.batch_decoding import Sampling
from utils.serving.request_scheduler import Job, QueueFull

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "tools": None, "functions": None, "logit_bias": None}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}},
                        status_code=err.status, headers=err.headers)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = "auto"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, allow_inf_nan=False)
    top_p: float | None = Field(default=None, allow_inf_nan=False)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extra_body
    adapters: dict[str, FiniteFloat] | None = None
    composition: Literal["mixture", "fusion"] | None = None
    lora_num: int | None = None
    weighting: Literal["uniform", "softmax"] | None = None
    exclude: list[str] | None = None
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    prompt_format: Literal["template", "raw"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]


class ChatRequest(_Common):
    messages: list[Message]
    chat_format: Literal["template", "chat_template"] | None = None


def _validation_message(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"] if not str(x).startswith("function-after")) or "body"
    if first["type"] == "missing":
        return f"The request lacks the required field '{loc}'.", loc
    return f"Invalid value for '{loc}': {first['msg']} (got {json.dumps(first.get('input'), default=str)[:80]}).", loc


class API:
    """The routes over one :class:`utils.serving.serving_engine.Engine`."""

    def __init__(self, engine, api_key: str | None = None, max_body_bytes: int = 1 << 20, retry_after_s: int = 1):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s

    # -- request checks ------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.api_key):
            raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>' with the server's --api_key.",
                           code="invalid_api_key", type_="authentication_error")

    async def read_json(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"The request body has {declared} bytes, over the limit of {self.max_body_bytes} "
                                f"(--max_body_bytes); send a shorter prompt.", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"The request body is over the limit of {self.max_body_bytes} bytes (--max_body_bytes); "
                                    "send a shorter prompt.", code="body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise APIError(400, f"The request body is not valid JSON ({err}); send a JSON object such as "
                                '{"model": "auto", "prompt": "..."}.', code="invalid_json") from err
        if not isinstance(body, dict):
            raise APIError(400, f"The request body is a JSON {type(body).__name__}; send a JSON object.", code="invalid_json")
        return body

    def parse(self, cls, body: dict):
        try:
            return cls.model_validate(body)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise APIError(400, message, param=param, code="invalid_value") from err

    def build_job(self, req, prompt_ids: list[int], query: str, emit) -> Job:
        """A scheduler :class:`Job` from a parsed request; every field checked against the pool and limits."""
        eng, d = self.engine, self.engine.defaults
        for name, neutral in UNSUPPORTED.items():
            value = (req.model_extra or {}).get(name, neutral)
            if value not in (neutral, None):
                raise APIError(400, f"'{name}' is not supported by this server; leave it out.", param=name, code="unsupported")
        names = set(eng.adapter_names)
        model = req.model
        if model not in ("auto", "base") and model not in names:
            raise APIError(404, f"Unknown model {model!r}: use 'auto' (retrieve adapters), 'base' (no adapter) or one of the "
                                f"pool's adapters (GET /v1/models lists them).", param="model", code="model_not_found")
        if model == "auto" and not names and req.adapters is None:
            model = "base"
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if max_tokens is None:
            max_tokens = d.max_tokens
        if max_tokens < 1 or max_tokens > d.max_tokens_cap:
            raise APIError(400, f"'max_tokens' must be between 1 and {d.max_tokens_cap} (the server's --max_tokens_cap); got {max_tokens}.",
                           param="max_tokens", code="invalid_value")
        if not prompt_ids:
            raise APIError(400, "The prompt is empty after tokenisation; send some text.", param="prompt", code="invalid_value")
        if len(prompt_ids) + max_tokens > eng.context_length:
            raise APIError(400, f"The prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}, which exceeds the model's context of "
                                f"{eng.context_length} tokens; shorten the prompt or lower max_tokens.",
                           param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
        temperature = 0.0 if req.temperature is None else req.temperature
        if not 0.0 <= temperature <= 2.0:
            raise APIError(400, f"'temperature' must be between 0 and 2 (0 is greedy); got {temperature}.", param="temperature", code="invalid_value")
        top_p = 1.0 if req.top_p is None else req.top_p
        if not 0.0 < top_p <= 1.0:
            raise APIError(400, f"'top_p' must be above 0 and at most 1; got {top_p}.", param="top_p", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 8 or any(not s for s in stop):
            raise APIError(400, "'stop' takes up to 8 non-empty strings.", param="stop", code="invalid_value")
        exclude = list(req.exclude or [])
        unknown = sorted(set(exclude) - names)
        if unknown:
            raise APIError(400, f"'exclude' names adapters that are not in the pool: {unknown}; GET /v1/models lists them.",
                           param="exclude", code="invalid_value")
        adapters = None
        target = model
        if req.adapters is not None:
            if model not in ("auto",):
                raise APIError(400, f"'adapters' gives an explicit mix; send it with model 'auto', not {model!r}.", param="adapters",
                               code="invalid_value")
            if not req.adapters:
                raise APIError(400, "'adapters' is empty; give {\"name\": weight, ...} or leave it out to retrieve.", param="adapters",
                               code="invalid_value")
            unknown = sorted(set(req.adapters) - names)
            if unknown:
                raise APIError(400, f"'adapters' names adapters that are not in the pool: {unknown}; GET /v1/models lists them.",
                               param="adapters", code="invalid_value")
            if any(abs(w) > 1e3 for w in req.adapters.values()):
                raise APIError(400, "'adapters' weights must lie between -1000 and 1000.", param="adapters", code="invalid_value")
            adapters, target = dict(req.adapters), "mix"
        elif model in names:
            adapters, target = {model: 1.0}, "mix"
        lora_num = d.lora_num if req.lora_num is None else req.lora_num
        cap = eng.pool.max_loras if eng.pool is not None else None
        if cap is not None and adapters is not None and len(adapters) > cap:
            raise APIError(400, f"'adapters' names {len(adapters)} adapters, over the {cap} one batch may use (the server's --max_loras); "
                                "send fewer.", param="adapters", code="invalid_value")
        if cap is not None and target == "auto" and lora_num > cap:
            raise APIError(400, f"'lora_num' {lora_num} is over the {cap} adapters one batch may use (the server's --max_loras); "
                                "ask for fewer.", param="lora_num", code="invalid_value")
        if target == "auto":
            available = len(self.engine.router.retriever.names) if self.engine.router.retriever is not None else 0
            available -= len(set(exclude) & set(self.engine.router.retriever.names if self.engine.router.retriever else []))
            if not 1 <= lora_num <= available:
                raise APIError(400, f"'lora_num' must be between 1 and {available} (the pool's adapters"
                                    + (" left after 'exclude'" if exclude else "") + f"); got {lora_num}.", param="lora_num", code="invalid_value")
        composition = req.composition or d.composition
        if target == "auto":
            route = Route("auto", k=lora_num, weighting=req.weighting or d.weighting, temperature=d.softmax_temperature,
                          exclude=tuple(exclude), mode=composition)
        elif target == "mix":
            route = Route("mix", mix=tuple(adapters.items()), mode=composition)
        else:
            route = Route("base")
        return Job(prompt_ids=prompt_ids, query=query, max_new_tokens=max_tokens, emit=emit,
                   sampling=Sampling(temperature=temperature, top_p=top_p, seed=req.seed), stop=stop, route=route,
                   ignore_eos=req.ignore_eos)

    # -- running a job -------------------------------------------------------------------------------------
    def submit(self, make_job):
        """Create the job with an emit that feeds an asyncio queue, and queue it; returns (job, queue)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, payload):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

        job = make_job(emit)
        try:
            self.engine.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, f"The server is busy ({err}); retry after {self.retry_after_s} s.", code="queue_full",
                           type_="rate_limit_error", headers={"Retry-After": str(self.retry_after_s)}) from err
        return job, queue


def create_app(engine, api_key: str | None = None, max_body_bytes: int = 1 << 20, admin=None, bind_host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI application over ``engine``; its lifespan starts and stops the scheduler thread.

    ``admin``: a :class:`utils.serving.pool_admin.PoolAdmin` for the runtime pool routes (built over ``engine`` when None).
    ``bind_host``: the address the server binds (pool changes without an API key answer only on a loopback one).
    """
    from utils.serving.pool_admin import PoolAdmin, add_pool_routes

    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    api = API(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app):
        if not engine.scheduler.alive:
            engine.scheduler.start()
        yield
        await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="LoraRetriever server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.api = api
    if engine.pool is not None:
        metrics.watch_pool(engine.pool)
    if admin is None:
        from utils.serving.pool_admin import default_roots

        admin = PoolAdmin(engine, default_roots(engine.entries))
    app.state.admin = admin
    add_pool_routes(app, api, admin, bind_host)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        metrics.errors.labels(err.code or err.type).inc()
        return error_response(err)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return error_response(APIError(404, f"No route {request.method} {request.url.path}; see GET /docs.", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}; see GET /docs.", code="method_not_allowed"))

    @app.get("/health")
    async def health():
        ok = engine.scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": engine.model_name, "adapters": len(engine.entries),
                **engine.scheduler.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        index = WEB_DIR / "index.html"
        if not index.is_file():
            raise APIError(404, "The web page is not installed (web/index.html is missing).", code="not_found")
        return FileResponse(index, media_type="text/html")

    @app.get("/web/{name}")
    async def web_asset(name: str):
        path = (WEB_DIR / name).resolve()
        if path.parent != WEB_DIR or not path.is_file():  # names only: no path leaves web/
            raise APIError(404, f"No web asset {name!r}.", code="not_found")
        return FileResponse(path)

    @app.get("/v1/models")
    async def models(request: Request):
        api.check_auth(request)
        created = int(engine.started)
        data = [{"id": "auto", "object": "model", "created": created, "owned_by": "lora-retriever",
                 "description": "retrieves the top-k adapters for each input and composes them", "domain": None},
                {"id": "base", "object": "model", "created": created, "owned_by": "lora-retriever",
                 "description": "the base model without adapters", "domain": None}]
        data += [{"id": e.name, "object": "model", "created": created, "owned_by": "lora-retriever", "domain": e.domain,
                  "description": f"the {e.name} adapter alone"} for e in engine.entries]
        return {"object": "list", "data": data, "base_model": engine.model_name,
                "defaults": {"composition": engine.defaults.composition, "lora_num": engine.defaults.lora_num,
                             "weighting": engine.defaults.weighting, "max_tokens": engine.defaults.max_tokens,
                             "max_tokens_cap": engine.defaults.max_tokens_cap}}

    async def handle(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            api.check_auth(request)
            body = await api.read_json(request)
            req = api.parse(ChatRequest if chat else CompletionRequest, body)
            if chat:
                if not req.messages:
                    raise APIError(400, "'messages' is empty; send at least one message.", param="messages", code="invalid_value")
                messages = [{"role": "system" if m.role == "developer" else m.role,
                             "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                            for m in req.messages]
                if not any(m["role"] == "user" and m["content"].strip() for m in messages):
                    raise APIError(400, "'messages' has no non-empty user message; send the user's text.", param="messages", code="invalid_value")
                fmt = req.chat_format or engine.defaults.chat_format
                if fmt == "chat_template" and not getattr(engine.tokenizer, "chat_template", None):
                    raise APIError(400, "This model's tokenizer has no chat template; use chat_format 'template'.", param="chat_format",
                                   code="invalid_value")
                prompt_ids, query = await asyncio.to_thread(engine.chat_prompt, messages, fmt)
            else:
                prompt = req.prompt
                if isinstance(prompt, list):
                    if len(prompt) != 1:
                        raise APIError(400, f"'prompt' lists {len(prompt)} prompts; send one prompt per request (requests are batched "
                                            "by the server).", param="prompt", code="invalid_value")
                    prompt = prompt[0]
                if not prompt.strip():
                    raise APIError(400, "'prompt' is empty; send some text.", param="prompt", code="invalid_value")
                prompt_ids, query = await asyncio.to_thread(engine.completion_prompt, prompt, req.prompt_format or engine.defaults.prompt_format)
            job, queue = api.submit(lambda emit: api.build_job(req, prompt_ids, query, emit))
        except APIError as err:
            metrics.requests.labels(endpoint, str(err.status)).inc()
            metrics.errors.labels(err.code or err.type).inc()
            return error_response(err)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, queue, rid, created, req.model, chat, include_usage, endpoint),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, job, queue, rid, created, req.model, chat, endpoint)

    async def collect(request, job, queue, rid, created, model, chat, endpoint):
        text, meta = [], {}
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.scheduler.cancel(job)
                        return Response(status_code=499)
                    continue
                if kind == "meta":
                    meta = payload
                elif kind == "delta":
                    text.append(payload["text"])
                elif kind == "error":
                    err = APIError(payload["status"], payload["message"], code="generation_failed", type_="server_error")
                    metrics.requests.labels(endpoint, str(err.status)).inc()
                    metrics.errors.labels(err.code).inc()
                    return error_response(err)
                elif kind == "done":
                    break
        except asyncio.CancelledError:
            engine.scheduler.cancel(job)
            raise
        metrics.requests.labels(endpoint, "200").inc()
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": payload["finish_reason"]}
                  if chat else {"index": 0, "text": content, "logprobs": None, "finish_reason": payload["finish_reason"]})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
                "choices": [choice], "usage": payload["usage"], "adapters": meta.get("adapters", []),
                "composition": meta.get("composition"), "timings": payload["timings"]}

    async def stream(job, queue, rid, created, model, chat, include_usage, endpoint):
        obj = "chat.completion.chunk" if chat else "text_completion"
        meta, finished = {}, False

        def chunk(delta_text=None, finish=None, extra=None, role=False):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        try:
            while True:
                kind, payload = await queue.get()
                if kind == "meta":
                    meta = payload
                    yield chunk("", extra={"adapters": payload["adapters"], "composition": payload["composition"]}, role=True)
                elif kind == "delta":
                    yield chunk(payload["text"])
                elif kind == "error":
                    metrics.requests.labels(endpoint, str(payload["status"])).inc()
                    metrics.errors.labels("generation_failed").inc()
                    finished = True
                    err = {"message": payload["message"], "type": "server_error", "param": None, "code": "generation_failed"}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "done":
                    finished = True
                    metrics.requests.labels(endpoint, "200").inc()
                    yield chunk(None if chat else "", finish=payload["finish_reason"],
                                extra={"adapters": meta.get("adapters", []), "composition": meta.get("composition"),
                                       "timings": payload["timings"]})
                    if include_usage:
                        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": payload["usage"]}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away mid-stream: the row leaves its batch at the next step
                engine.scheduler.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app
