"""Stage: the server's HTTP API, OpenAI-compatible (FastAPI). Requests become scheduler jobs; answers stream back.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (the web page, ``web/index.html``), and the runtime pool routes
``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` (:mod:`utils.serving.pool_admin`), and the
training jobs ``POST /v1/adapters/train``, ``GET``/``DELETE /v1/adapters/train/{id}`` (:mod:`utils.serving.training_jobs`).

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

from dataclasses import dataclass

from utils.routing import Route
from utils.serving.batch_decoding import Sampling
from utils.serving.openai_format import TokenText, chat_logprobs, completion_logprobs, merge_completion_logprobs
from utils.serving.request_scheduler import Job, QueueFull

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
UNSUPPORTED = {"suffix": None, "tools": None, "functions": None, "logit_bias": None, "tool_choice": None}
MAX_CHOICES = 64  # prompts x n in one request (lm-evaluation-harness batches its loglikelihood requests)


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
    continuous_usage_stats: bool = False


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
    n: int = 1
    best_of: int | None = None
    prompt_logprobs: int | None = None  # vLLM's extra field: logprobs of the prompt's tokens (and this many alternatives)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    prompt_format: Literal["template", "raw"] | None = None
    logprobs: int | None = None
    echo: bool = False


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
    logprobs: bool = False
    top_logprobs: int | None = None


def _validation_message(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"] if not str(x).startswith("function-after")) or "body"
    if first["type"] == "missing":
        return f"The request lacks the required field '{loc}'.", loc
    return f"Invalid value for '{loc}': {first['msg']} (got {json.dumps(first.get('input'), default=str)[:80]}).", loc


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

    async def read_json(self, request: Request, limit: int | None = None, flag: str = "--max_body_bytes") -> dict:
        limit = self.max_body_bytes if limit is None else limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"The request body has {declared} bytes, over the limit of {limit} ({flag}); send less.",
                           code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"The request body is over the limit of {limit} bytes ({flag}); send less.", code="body_too_large")
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

    def logprob_settings(self, req) -> tuple[int | None, int | None]:
        """(top alternatives recorded per generated token, per prompt token), None where not asked; checked against
        ``--max_logprobs``."""
        cap = self.engine.defaults.max_logprobs
        chat = isinstance(req, ChatRequest)

        def checked(value, name):
            if value is None:
                return None
            if not 0 <= value <= cap:
                raise APIError(400, f"'{name}' must be between 0 and {cap} (the server's --max_logprobs); got {value}.", param=name,
                               code="invalid_value")
            return value

        if chat:
            top = checked(req.top_logprobs, "top_logprobs")
            if top is not None and not req.logprobs:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
            gen = (top or 0) if req.logprobs else None
            prompt = checked(req.prompt_logprobs, "prompt_logprobs")
        else:
            gen = checked(req.logprobs, "logprobs")
            prompt = checked(req.prompt_logprobs, "prompt_logprobs")
            if req.echo and gen is not None and prompt is None:
                prompt = gen  # echo with logprobs: the prompt's tokens get them too
        return gen, prompt

    def build_job(self, req, prompt_ids: list[int], query: str, emit, seed: int | None = None) -> Job:
        """A scheduler :class:`Job` from a parsed request; every field checked against the pool and limits.

        ``seed`` overrides the request's (each of ``n`` choices gets its own)."""
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
        low = 0 if getattr(req, "echo", False) else 1  # echo with max_tokens 0 scores the prompt only
        if max_tokens < low or max_tokens > d.max_tokens_cap:
            raise APIError(400, f"'max_tokens' must be between {low} and {d.max_tokens_cap} (the server's --max_tokens_cap)"
                                + ("" if low == 0 else "; 0 is allowed with echo") + f"; got {max_tokens}.",
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
        logprobs, prompt_logprobs = self.logprob_settings(req)
        if prompt_logprobs is not None and d.prompt_logprobs_refusal:
            raise APIError(400, d.prompt_logprobs_refusal, param="echo" if getattr(req, "echo", False) else "prompt_logprobs",
                           code="unsupported")
        return Job(prompt_ids=prompt_ids, query=query, max_new_tokens=max_tokens, emit=emit,
                   sampling=Sampling(temperature=temperature, top_p=top_p, seed=req.seed if seed is None else seed), stop=stop,
                   route=route, ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    # -- running jobs ------------------------------------------------------------------------------------
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


def create_app(engine, api_key: str | None = None, max_body_bytes: int = 1 << 20, admin=None, bind_host: str = "127.0.0.1",
               training=None, max_train_body_bytes: int = 32 << 20) -> FastAPI:
    """The FastAPI application over ``engine``; its lifespan starts and stops the scheduler thread.

    ``admin``: a :class:`utils.serving.pool_admin.PoolAdmin` for the runtime pool routes (built over ``engine`` when None).
    ``bind_host``: the address the server binds (pool changes without an API key answer only on a loopback one).
    ``training``: the :class:`utils.serving.training_jobs.TrainingJobs` behind ``/v1/adapters/train`` (None: no such routes).
    """
    from utils.serving.pool_admin import AdminError, PoolAdmin, is_loopback

    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    api = API(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    metrics = engine.metrics
    token_text = TokenText(engine.tokenizer, engine.tokenizer_lock)

    @asynccontextmanager
    async def lifespan(app):
        if not engine.scheduler.alive:
            engine.scheduler.start()
        if training is not None:
            training.start()
        yield
        if training is not None:  # a stop cancels the jobs cleanly: no partial adapter, the pool as it is
            await asyncio.to_thread(training.close)
        await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="LoraRetriever server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.api = api
    if engine.pool is not None:
        metrics.watch_pool(engine.pool)
    if admin is None:
        from utils.serving.pool_admin import default_roots

        admin = PoolAdmin(engine, default_roots(engine.entries))
    app.state.admin = admin

    async def change_pool(request: Request, fn, body_limit: int | None = None, status: int = 200, read_body: bool = True):
        """A runtime pool change (:mod:`utils.serving.pool_admin`): the API key when one is set, else a loopback bind."""
        api.check_auth(request)
        if api.api_key is None and not is_loopback(bind_host):
            raise APIError(403, f"Pool changes need an API key when the server binds {bind_host}: restart it with --api_key, or bind "
                                "127.0.0.1.", code="forbidden", type_="permission_error")
        body = (await api.read_json(request, body_limit, "--max_train_body_bytes" if body_limit else "--max_body_bytes")
                if read_body else None)
        try:
            return JSONResponse(await asyncio.to_thread(fn, body), status_code=status)
        except AdminError as err:
            raise APIError(err.status, err.message, param=err.param, code=err.code,
                           headers={"Retry-After": "5"} if err.status == 429 else None) from err

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await change_pool(request, admin.load)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await change_pool(request, admin.unload)

    if training is not None:
        @app.post("/v1/adapters/train")
        async def train_adapter(request: Request):
            return await change_pool(request, training.submit, body_limit=max_train_body_bytes, status=202)

        @app.get("/v1/adapters/train")
        async def training_jobs(request: Request):
            api.check_auth(request)
            return training.list()

        @app.get("/v1/adapters/train/{job_id}")
        async def training_job(request: Request, job_id: str):
            api.check_auth(request)
            try:
                return training.get(job_id)
            except AdminError as err:
                raise APIError(err.status, err.message, param=err.param, code=err.code) from err

        @app.delete("/v1/adapters/train/{job_id}")
        async def cancel_training_job(request: Request, job_id: str):
            return await change_pool(request, lambda _: training.cancel(job_id), read_body=False)

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

    def completion_prompts(req) -> list[tuple[list[int], str, str]]:
        """(prompt ids, retrieval query, echo text) of each prompt of a completion request: a string, a list of strings,
        a list of token ids, or a list of token-id lists. A token-id prompt is sent as it is, its query is its text."""
        prompt = req.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "'prompt' is empty; send a string, a list of strings, a list of token ids or a list of such lists.",
                           param="prompt", code="invalid_value")
        fmt = req.prompt_format or engine.defaults.prompt_format
        vocab = len(engine.tokenizer)
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if not p.strip():
                    raise APIError(400, f"'prompt'[{i}] is empty; send some text.", param="prompt", code="invalid_value")
                ids, query = engine.completion_prompt(p, fmt)
                out.append((ids, query, p if fmt == "raw" else engine.decode(ids)))
            else:
                if not p or any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                    raise APIError(400, f"'prompt'[{i}] must be a non-empty list of token ids between 0 and {vocab - 1}.",
                                   param="prompt", code="invalid_value")
                text = engine.decode(p)
                out.append((list(p), text, text))
        return out

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
                prompts = [(prompt_ids, query, None)]
            else:
                prompts = await asyncio.to_thread(completion_prompts, req)
            n = req.n
            if not 1 <= n <= MAX_CHOICES:
                raise APIError(400, f"'n' must be between 1 and {MAX_CHOICES}; got {n}.", param="n", code="invalid_value")
            if req.best_of is not None and req.best_of != n:
                raise APIError(400, "'best_of' is not supported (it would generate choices and return only some); leave it out.",
                               param="best_of", code="unsupported")
            if n > 1 and not (req.temperature or 0) > 0:
                raise APIError(400, "'n' > 1 with greedy decoding (temperature 0) would return n identical choices; set a temperature "
                                    "above 0 to sample them, or send n = 1.", param="n", code="invalid_value")
            if len(prompts) * n > MAX_CHOICES:
                raise APIError(400, f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} choices; send at most {MAX_CHOICES} per request.",
                               param="prompt", code="invalid_value")
            queue: asyncio.Queue = asyncio.Queue()
            jobs = api.submit_all(queue, [(lambda emit, p=p, j=j: api.build_job(req, p[0], p[1], emit,
                                                                                 seed=None if req.seed is None else req.seed + j))
                                          for p in prompts for j in range(n)])
        except APIError as err:
            metrics.requests.labels(endpoint, str(err.status)).inc()
            metrics.errors.labels(err.code or err.type).inc()
            return error_response(err)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        echo_texts = [p[2] for p in prompts for _ in range(n)] if not chat and req.echo else None
        prompt_tokens = sum(len(p[0]) for p in prompts)
        ctx = Reply(rid, created, req.model, chat, endpoint, jobs, echo_texts, prompt_tokens)
        if req.stream:
            opts = req.stream_options
            return StreamingResponse(stream(ctx, queue, bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, ctx, queue)

    def logprobs_of(ctx, i: int, seq, text_start: int = 0):
        """The ``logprobs`` of choice i: prompt tokens first with echo (or ``prompt_logprobs``), then the generated ones."""
        gen = seq.logprobs is not None
        if ctx.chat:
            return chat_logprobs(token_text, seq.generated, seq.token_logprobs, seq.top_logprobs) if gen else None
        prompt = None
        if ctx.echo_texts is not None and seq.prompt_logprobs is not None:
            prompt = completion_logprobs(token_text, seq.prompt_ids, seq.prompt_token_logprobs, seq.prompt_top_logprobs)
        if not gen:
            return prompt
        start = text_start + (sum(len(t) for t in prompt["tokens"]) if prompt is not None else 0)
        return merge_completion_logprobs(prompt, completion_logprobs(token_text, seq.generated, seq.token_logprobs, seq.top_logprobs, start))

    def prompt_logprobs_of(seq):
        """vLLM's ``prompt_logprobs`` field: per prompt token {token id: {logprob, decoded_token}} (None for the first)."""
        if seq.prompt_logprobs is None:
            return None
        out = []
        for t, lp, top in zip(seq.prompt_ids, seq.prompt_token_logprobs, seq.prompt_top_logprobs):
            if lp is None:
                out.append(None)
                continue
            entry = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": token_text(i)} for r, (i, v) in enumerate(top)}
            entry.setdefault(str(t), {"logprob": lp, "rank": None, "decoded_token": token_text(t)})
            out.append(entry)
        return out

    async def collect(request, ctx, queue):
        k = len(ctx.jobs)
        texts, metas, dones = [[] for _ in range(k)], [{} for _ in range(k)], [None] * k
        try:
            while any(d is None for d in dones):
                try:
                    i, kind, payload = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        for job in ctx.jobs:
                            engine.scheduler.cancel(job)
                        return Response(status_code=499)
                    continue
                if kind == "meta":
                    metas[i] = payload
                elif kind == "delta":
                    texts[i].append(payload["text"])
                elif kind == "error":
                    for job in ctx.jobs:
                        engine.scheduler.cancel(job)
                    err = APIError(payload["status"], payload["message"], code=payload.get("code", "generation_failed"),
                                   type_=payload.get("type", "server_error"))
                    metrics.requests.labels(ctx.endpoint, str(err.status)).inc()
                    metrics.errors.labels(err.code).inc()
                    return error_response(err)
                elif kind == "done":
                    dones[i] = payload
        except asyncio.CancelledError:
            for job in ctx.jobs:
                engine.scheduler.cancel(job)
            raise
        metrics.requests.labels(ctx.endpoint, "200").inc()
        choices = []
        for i in range(k):
            content, seq = "".join(texts[i]), dones[i]["seq"]
            if ctx.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": content}, "logprobs": logprobs_of(ctx, i, seq),
                          "finish_reason": dones[i]["finish_reason"]}
            else:
                echo = ctx.echo_texts[i] if ctx.echo_texts is not None else ""
                choice = {"index": i, "text": echo + content, "logprobs": logprobs_of(ctx, i, seq), "finish_reason": dones[i]["finish_reason"]}
                if seq.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_of(seq)
            if k > 1:
                choice.update(adapters=metas[i].get("adapters", []), composition=metas[i].get("composition"))
            choices.append(choice)
        completion = sum(d["usage"]["completion_tokens"] for d in dones)
        usage = {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": completion, "total_tokens": ctx.prompt_tokens + completion}
        return {"id": ctx.rid, "object": "chat.completion" if ctx.chat else "text_completion", "created": ctx.created, "model": ctx.model,
                "choices": choices, "usage": usage, "adapters": metas[0].get("adapters", []),
                "composition": metas[0].get("composition"), "timings": dones[0]["timings"]}

    async def stream(ctx, queue, include_usage: bool, continuous_usage: bool):
        chat = ctx.chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        k = len(ctx.jobs)
        metas, finished = [{} for _ in range(k)], [False] * k
        generated, offsets = [0] * k, [0] * k

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
                    metas[i] = payload
                    echo = ctx.echo_texts[i] if ctx.echo_texts is not None else ""
                    offsets[i] = len(echo)
                    yield chunk(i, echo, extra={"adapters": payload["adapters"], "composition": payload["composition"]}, role=True)
                elif kind == "delta":
                    generated[i] += len(payload["token_ids"])
                    lp = None
                    if "token_logprobs" in payload:
                        ids, lps, tops = payload["token_ids"], payload["token_logprobs"], payload["top_logprobs"]
                        lp = (chat_logprobs(token_text, ids, lps, tops) if chat
                              else completion_logprobs(token_text, ids, lps, tops, offsets[i]))
                        offsets[i] += sum(len(token_text(t)) for t in ids)
                    yield chunk(i, payload["text"], logprobs=lp)
                elif kind == "error":
                    for job in ctx.jobs:
                        engine.scheduler.cancel(job)
                    metrics.requests.labels(ctx.endpoint, str(payload["status"])).inc()
                    code = payload.get("code", "generation_failed")
                    metrics.errors.labels(code).inc()
                    finished = [True] * k
                    err = {"message": payload["message"], "type": payload.get("type", "server_error"), "param": None, "code": code}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "done":
                    finished[i] = True
                    generated[i] = payload["usage"]["completion_tokens"]
                    extra = {"adapters": metas[i].get("adapters", []), "composition": metas[i].get("composition"), "timings": payload["timings"]}
                    seq = payload["seq"]
                    if ctx.echo_texts is not None and seq.prompt_logprobs is not None and seq.logprobs is not None:
                        extra["prompt_logprobs"] = prompt_logprobs_of(seq)
                    yield chunk(i, None if chat else "", finish=payload["finish_reason"], extra=extra)
            metrics.requests.labels(ctx.endpoint, "200").inc()
            if include_usage:
                body = {"id": ctx.rid, "object": obj, "created": ctx.created, "model": ctx.model, "choices": [], "usage": usage()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not all(finished):  # the client went away mid-stream: the rows leave their batch at the next step
                for job in ctx.jobs:
                    engine.scheduler.cancel(job)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        api.check_auth(request)
        body = await api.read_json(request)
        special = body.get("add_special_tokens")
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise APIError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages", code="invalid_value")
            if not getattr(engine.tokenizer, "chat_template", None):
                raise APIError(400, "This model's tokenizer has no chat template; tokenize a 'prompt' instead.", param="messages",
                               code="invalid_value")
            with engine.tokenizer_lock:
                text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                                                            tokenize=False)
            ids = engine.encode(text, special_tokens=bool(special) if special is not None else False)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "Send 'prompt' (a string) or 'messages' to tokenize.", param="prompt", code="invalid_value")
            ids = engine.encode(prompt, special_tokens=True if special is None else bool(special))
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        api.check_auth(request)
        body = await api.read_json(request)
        tokens = body.get("tokens")
        vocab = len(engine.tokenizer)
        if not isinstance(tokens, list) or any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids between 0 and {vocab - 1}.", param="tokens", code="invalid_value")
        return {"prompt": engine.decode(tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        api.check_auth(request)
        tok = engine.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "unk_token": getattr(tok, "unk_token", None), "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": engine.context_length, "vocab_size": len(tok)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app
