"""Stage: the server's HTTP API, OpenAI-compatible (FastAPI): the routes wired to their parts.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (the web page, ``web/index.html``), ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``, and the pool and training routes (:mod:`utils.serving.pool_routes`).

A request is checked in one place (:mod:`utils.serving.protocol`), becomes scheduler jobs, and is answered by
:mod:`utils.serving.responses`; this module only wires them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from utils.serving.pool_routes import PoolRoutes
from utils.serving.protocol import APIError, Requests, error_response
from utils.serving.responses import Reply, Responder

WEB_DIR = Path(__file__).resolve().parents[2] / "web"


def create_app(engine, api_key: str | None = None, max_body_bytes: int = 1 << 20, admin=None, bind_host: str = "127.0.0.1",
               training=None, max_train_body_bytes: int = 32 << 20) -> FastAPI:
    """The FastAPI application over ``engine``; its lifespan starts and stops the scheduler thread.

    ``admin``: a :class:`utils.serving.pool_admin.PoolAdmin` for the runtime pool routes (built over ``engine`` when None).
    ``bind_host``: the address the server binds (pool changes without an API key answer only on a loopback one).
    ``training``: the :class:`utils.serving.training_jobs.TrainingJobs` behind ``/v1/adapters/train`` (None: no such routes).
    """
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if not engine.scheduler.alive:
            engine.scheduler.start()
        if training is not None:
            training.start()
        yield
        if training is not None:  # a stop cancels the jobs cleanly: no partial adapter, the pool as it is
            await asyncio.to_thread(training.close)
        if engine.scoring is not None:
            engine.scoring.close()
        await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="LoraRetriever server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    requests = Requests(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    app.state.api = requests
    if engine.pool is not None:
        engine.metrics.watch_pool(engine.pool)
    if admin is None:
        from utils.serving.pool_admin import PoolAdmin, default_roots

        admin = PoolAdmin(engine, default_roots(engine.entries))
    app.state.admin = admin
    PoolRoutes(requests, admin, training, bind_host, max_train_body_bytes).add_to(app)
    add_service_routes(app, engine, requests)
    add_tokenizer_routes(app, engine, requests)
    add_generation_routes(app, engine, requests, Responder(engine))
    return app


def add_service_routes(app: FastAPI, engine, requests: Requests) -> None:
    """Errors as JSON, health, metrics, the web page and the model list."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = engine.metrics

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
        if engine.scoring is not None:
            body["task_scoring"] = engine.scoring.status()
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
        requests.check_auth(request)
        created = int(engine.started)
        data = [{"id": "auto", "object": "model", "created": created, "owned_by": "lora-retriever",
                 "description": "retrieves the top-k adapters for each input and composes them", "domain": None},
                {"id": "base", "object": "model", "created": created, "owned_by": "lora-retriever",
                 "description": "the base model without adapters", "domain": None}]
        data += [{"id": e.name, "object": "model", "created": created, "owned_by": "lora-retriever", "domain": e.domain,
                  "description": f"the {e.name} adapter alone"} for e in engine.entries]
        return {"object": "list", "data": data, "base_model": engine.model_name,
                "defaults": {"composition": engine.defaults.composition, "lora_num": engine.defaults.lora_num, "routing": engine.defaults.routing,
                             "task_routing": engine.router.tasks is not None if engine.pool is not None else False,
                             "weighting": engine.defaults.weighting, "max_tokens": engine.defaults.max_tokens,
                             "max_tokens_cap": engine.defaults.max_tokens_cap}}


def add_tokenizer_routes(app: FastAPI, engine, requests: Requests) -> None:
    """vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``."""

    @app.post("/tokenize")
    async def tokenize(request: Request):
        requests.check_auth(request)
        body = await requests.read_json(request)
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
        requests.check_auth(request)
        body = await requests.read_json(request)
        tokens = body.get("tokens")
        vocab = len(engine.tokenizer)
        if not isinstance(tokens, list) or any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids between 0 and {vocab - 1}.", param="tokens", code="invalid_value")
        return {"prompt": engine.decode(tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        requests.check_auth(request)
        tok = engine.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "unk_token": getattr(tok, "unk_token", None), "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": engine.context_length, "vocab_size": len(tok)}


def add_generation_routes(app: FastAPI, engine, requests: Requests, responder: Responder) -> None:
    """``/v1/completions`` and ``/v1/chat/completions``: check, queue one job per choice, answer or stream."""
    metrics = engine.metrics

    async def handle(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            accepted = await requests.accept(request, chat)
            queue: asyncio.Queue = asyncio.Queue()
            jobs = responder.submit_all(queue, requests.job_makers(accepted))
        except APIError as err:
            metrics.requests.labels(endpoint, str(err.status)).inc()
            metrics.errors.labels(err.code or err.type).inc()
            return error_response(err)
        req, prompts, n = accepted.req, accepted.prompts, accepted.n
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        echo_texts = [p[2] for p in prompts for _ in range(n)] if not chat and req.echo else None
        prompt_tokens = sum(len(p[0]) for p in prompts)
        ctx = Reply(rid, created, req.model, chat, endpoint, jobs, echo_texts, prompt_tokens)
        if req.stream:
            opts = req.stream_options
            return StreamingResponse(responder.stream(ctx, queue, bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await responder.collect(request, ctx, queue)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)
