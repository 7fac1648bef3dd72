"""Stage: the server's requests. Their models, and every check a request passes before it becomes scheduler jobs.

A request that passes :meth:`Requests.accept` and :meth:`Requests.build_job` is valid: its fields, its prompt and its
choices are checked here against the server's limits and its pool, each failure an :class:`APIError` with a 4xx
status whose message names the field and the fix (``{"error": {"message", "type", "param", "code"}}``).

``model`` is ``auto`` (route the input to adapters and compose them), ``base`` (no adapter) or
an adapter's name (that adapter alone). Extra body fields, sent by the ``openai`` client with ``extra_body``:
``routing`` (how ``auto`` routes: ``retrieval``, the top-k adapters by their cards, or ``lorauter``, through the
nearest tasks of the task library; default: the server's ``--routing``),
``adapters`` ({name: weight}, used as given), ``composition`` (mixture | fusion), ``lora_num``, ``weighting``
(uniform | softmax), ``exclude`` ([names]), ``chat_format`` / ``prompt_format``, ``ignore_eos`` (vLLM's: always generate
``max_tokens``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from utils.decoding import Sampling
from utils.routing import Route
from utils.serving.scheduling import Job

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
    routing: Literal["retrieval", "lorauter"] | None = None
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
class Accepted:
    """A parsed request and its prompts: (prompt ids, retrieval query, echo text) each, ``n`` choices per prompt."""

    req: object
    chat: bool
    prompts: list
    n: int


class Requests:
    """Every check of a request to the server over one :class:`utils.serving.serving_engine.Engine`."""

    def __init__(self, engine, api_key: str | None = None, max_body_bytes: int = 1 << 20):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

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
        """A scheduler :class:`Job` from a parsed request; every field checked against the pool and limits, in this
        order: unsupported fields, ``model``, the decoding limits (:meth:`decoding`), the adapters (:meth:`route`),
        the logprobs. ``seed`` overrides the request's (each of ``n`` choices gets its own)."""
        d = self.engine.defaults
        for name, neutral in UNSUPPORTED.items():
            value = (req.model_extra or {}).get(name, neutral)
            if value not in (neutral, None):
                raise APIError(400, f"'{name}' is not supported by this server; leave it out.", param=name, code="unsupported")
        names = set(self.engine.adapter_names)
        model = req.model
        if model not in ("auto", "base") and model not in names:
            raise APIError(404, f"Unknown model {model!r}: use 'auto' (retrieve adapters), 'base' (no adapter) or one of the "
                                f"pool's adapters (GET /v1/models lists them).", param="model", code="model_not_found")
        if model == "auto" and not names and req.adapters is None:
            model = "base"
        max_tokens, sampling, stop = self.decoding(req, prompt_ids, seed)
        route = self.route(req, model, names)
        logprobs, prompt_logprobs = self.logprob_settings(req)
        if prompt_logprobs is not None and d.prompt_logprobs_refusal:
            raise APIError(400, d.prompt_logprobs_refusal, param="echo" if getattr(req, "echo", False) else "prompt_logprobs",
                           code="unsupported")
        return Job(prompt_ids=prompt_ids, query=query, max_new_tokens=max_tokens, emit=emit, sampling=sampling, stop=stop,
                   route=route, ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def decoding(self, req, prompt_ids: list[int], seed: int | None) -> tuple[int, Sampling, list[str]]:
        """(max tokens, sampling, stop strings), checked against the server's limits and the model's context."""
        eng, d = self.engine, self.engine.defaults
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
        return max_tokens, Sampling(temperature=temperature, top_p=top_p, seed=req.seed if seed is None else seed), stop

    def route(self, req, model: str, names: set[str]) -> Route:
        """What the request asks of the router: ``exclude``, an explicit ``adapters`` mix, one adapter by name, or
        retrieval of ``lora_num`` adapters; checked against the pool and ``--max_loras``."""
        eng, d = self.engine, self.engine.defaults
        exclude = list(req.exclude or [])
        unknown = sorted(set(exclude) - names)
        if unknown:
            raise APIError(400, f"'exclude' names adapters that are not in the pool: {unknown}; GET /v1/models lists them.",
                           param="exclude", code="invalid_value")
        adapters, target = self.explicit_mix(req, model, names)
        lora_num = d.lora_num if req.lora_num is None else req.lora_num
        cap = eng.pool.max_loras if eng.pool is not None else None
        if cap is not None and adapters is not None and len(adapters) > cap:
            raise APIError(400, f"'adapters' names {len(adapters)} adapters, over the {cap} one batch may use (the server's --max_loras); "
                                "send fewer.", param="adapters", code="invalid_value")
        if cap is not None and target == "auto" and lora_num > cap:
            raise APIError(400, f"'lora_num' {lora_num} is over the {cap} adapters one batch may use (the server's --max_loras); "
                                "ask for fewer.", param="lora_num", code="invalid_value")
        composition = req.composition or d.composition
        if target == "mix":
            return Route("mix", mix=tuple(adapters.items()), mode=composition)
        if target != "auto":
            return Route("base")
        if (req.routing or d.routing) == "lorauter":
            tasks = eng.router.tasks
            if tasks is None:
                raise APIError(400, "'routing' lorauter: this server has no task library; start it with --routing lorauter or "
                                    "--task_library FILE.", param="routing", code="unsupported")
            if not any(tasks.rankings.get(t) for t in tasks.names):
                raise APIError(503, "The task library's adapters are still being scored; retry shortly or use 'routing': 'retrieval'.",
                               param="routing", code="not_ready")
            return Route("lorauter", k=d.lorauter_k, temperature=d.lorauter_temperature, exclude=tuple(exclude), mode=composition)
        retrievable = eng.router.retriever.names if eng.router.retriever is not None else []
        available = len(retrievable) - len(set(exclude) & set(retrievable))
        if not 1 <= lora_num <= available:
            raise APIError(400, f"'lora_num' must be between 1 and {available} (the pool's adapters"
                                + (" left after 'exclude'" if exclude else "") + f"); got {lora_num}.", param="lora_num", code="invalid_value")
        return Route("auto", k=lora_num, weighting=req.weighting or d.weighting, temperature=d.softmax_temperature,
                     exclude=tuple(exclude), mode=composition)

    @staticmethod
    def explicit_mix(req, model: str, names: set[str]) -> tuple[dict | None, str]:
        """(the adapters and weights the request names, and its target: ``mix``, ``auto`` or ``base``)."""
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
            return dict(req.adapters), "mix"
        if model in names:
            return {model: 1.0}, "mix"
        return None, model

    def completion_prompts(self, req) -> list[tuple[list[int], str, str]]:
        """(prompt ids, retrieval query, echo text) of each prompt of a completion request: a string, a list of strings,
        a list of token ids, or a list of token-id lists. A token-id prompt is sent as it is, its query is its text."""
        prompt = req.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "'prompt' is empty; send a string, a list of strings, a list of token ids or a list of such lists.",
                           param="prompt", code="invalid_value")
        fmt = req.prompt_format or self.engine.defaults.prompt_format
        vocab = len(self.engine.tokenizer)
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if not p.strip():
                    raise APIError(400, f"'prompt'[{i}] is empty; send some text.", param="prompt", code="invalid_value")
                ids, query = self.engine.completion_prompt(p, fmt)
                out.append((ids, query, p if fmt == "raw" else self.engine.decode(ids)))
            else:
                if not p or any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                    raise APIError(400, f"'prompt'[{i}] must be a non-empty list of token ids between 0 and {vocab - 1}.",
                                   param="prompt", code="invalid_value")
                text = self.engine.decode(p)
                out.append((list(p), text, text))
        return out

    async def accept(self, request: Request, chat: bool) -> Accepted:
        """The request read, parsed and checked, with its prompts tokenised (on a worker thread)."""
        self.check_auth(request)
        body = await self.read_json(request)
        req = self.parse(ChatRequest if chat else CompletionRequest, body)
        if chat:
            prompts = [await asyncio.to_thread(self.chat_prompt, req)]
        else:
            prompts = await asyncio.to_thread(self.completion_prompts, req)
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
        return Accepted(req, chat, prompts, n)

    def chat_prompt(self, req) -> tuple[list[int], str, None]:
        """(prompt ids, retrieval query, no echo text) of a chat request's conversation."""
        engine = self.engine
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
        prompt_ids, query = engine.chat_prompt(messages, fmt)
        return prompt_ids, query, None

    def job_makers(self, accepted: Accepted) -> list:
        """One ``maker(emit) -> Job`` per choice, prompt by prompt; choice j of a prompt is seeded ``seed + j``."""
        req = accepted.req
        return [(lambda emit, p=p, j=j: self.build_job(req, p[0], p[1], emit, seed=None if req.seed is None else req.seed + j))
                for p in accepted.prompts for j in range(accepted.n)]
