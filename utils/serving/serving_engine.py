"""What a server holds: the models, pool and retriever loaded once, and the scheduler that runs requests.

:func:`load_engine` builds an :class:`Engine` from the server's flags through the same :class:`Session`,
:class:`AdapterPool`, :class:`LoraRetriever` and :class:`Prompter` as ``main.py``; :class:`Engine` turns a
chat conversation or a completion prompt into prompt tokens and a retrieval query, as the evaluation does.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

from utils.data import InputError

logger = logging.getLogger(__name__)

CHAT_FORMATS = ("template", "chat_template")
PROMPT_FORMATS = ("template", "raw")


@dataclass
class Defaults:
    """Request defaults, from the server's flags."""

    composition: str = "mixture"
    lora_num: int = 3
    weighting: str = "uniform"
    softmax_temperature: float = 0.1  # T of weighting "softmax"
    max_tokens: int = 50
    max_tokens_cap: int = 1024
    max_logprobs: int = 20  # top alternatives a request may ask for per token (as vLLM's --max-logprobs)
    prompt_logprobs_refusal: str | None = None  # why requests needing prompt logprobs are refused (None: they are served)
    chat_format: str = "template"
    prompt_format: str = "template"
    routing: str = "retrieval"  # what model "auto" does: retrieval by cards, or lorauter (through tasks)
    lorauter_k: int = 3
    lorauter_temperature: float = 0.2


@dataclass
class Engine:
    """The objects a server builds once (see :func:`load_engine`)."""

    tokenizer: object
    model: object
    loras: object  # the served pool (utils.pool.Pool): entries, weights, retriever and router, changed together at run time
    prompter: object
    scheduler: object
    metrics: object
    context_length: int
    defaults: Defaults
    model_name: str
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.time)
    scoring: object = None  # utils.serving.task_scoring.LiveScoring where a task library routes (None: none)

    @property
    def pool(self):
        """The served adapters' weights (:class:`utils.adapter_pool.AdapterPool`), None without adapters."""
        return self.loras.adapters

    @property
    def entries(self) -> list:
        return self.loras.entries

    @property
    def router(self):
        return self.loras.router

    @property
    def retriever(self):
        return self.loras.retriever

    @property
    def adapter_names(self) -> list[str]:
        return self.loras.names

    def domains(self) -> dict[str, str]:
        return self.loras.domains()

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=special_tokens).input_ids

    def completion_prompt(self, prompt: str, prompt_format: str) -> tuple[list[int], str]:
        """(prompt token ids, retrieval query) of a completion prompt."""
        if prompt_format == "raw":
            return self.encode(prompt), prompt
        return self.encode(self.prompter.generate_prompt(prompt)), prompt

    def chat_prompt(self, messages: list[dict], chat_format: str) -> tuple[list[int], str]:
        """(prompt token ids, retrieval query) of a conversation [{role, content}].

        ``template``: the conversation is the instruction of the configured prompt template (alpaca for the
        embedded pool, the format its adapters were trained on): a system message first, earlier turns as
        ``User:``/``Assistant:`` lines, the last user message last. ``chat_template``: the tokenizer's own chat
        template with the generation prompt. The retrieval query is the last user message either way.
        """
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        if chat_format == "chat_template":
            with self.tokenizer_lock:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.encode(text, special_tokens=False), query
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) == 1:
            body = turns[0]["content"]
        else:
            body = "\n".join(f"{'Assistant' if m['role'] == 'assistant' else 'User'}: {m['content']}" for m in turns)
        instruction = "\n\n".join(system + [body])
        return self.encode(self.prompter.generate_prompt(instruction)), query


def eos_ids(tokenizer, model) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(x) for x in extra)
    return ids


def context_length_of(model, tokenizer) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else 2048


def load_engine(args, session=None) -> Engine:
    """Load the base model, the pool, the retriever and the prompt template once, and start the scheduler.

    ``args`` carries the server's flags (``serve.py --help``); every input file is checked before any model loads.
    """
    from utils.composition import LiveComposition
    from utils.data import load_pool_config
    from utils.decoding import BatchDecoder
    from utils.prompter import Prompter
    from utils.pool import build_pool
    from utils.retrieval import embedding_cache_dir
    from utils.serving.request_scheduler import Scheduler
    from utils.serving.server_metrics import ServerMetrics
    from utils.session import Session

    prompter = Prompter(args.template)
    entries = [] if args.no_adapters else load_pool_config(args.config_path, args.adapter_pattern)
    if entries and args.lora_num > len(entries):
        raise InputError(f"--lora_num {args.lora_num} is larger than the {len(entries)} adapters of {args.config_path}; lower --lora_num.")
    session = session or Session()
    t0 = time.time()
    on_vllm = getattr(args, "engine", "local") == "vllm"
    # With vLLM generating, this process needs the model's architecture only (the pool checks adapters against its
    # module shapes and composes on the host): a skeleton on the meta device, no weights.
    tokenizer, model = session.base(args.base_model, args.dtype, "meta" if on_vllm else args.device, None, args.linear_kernels)
    # The served pool changes at run time (utils/serving/pool_admin.py): this engine's own, not the session's.
    loras = build_pool(session, entries, args, device=args.device, cache_dir=embedding_cache_dir(args.embedding_cache), own=True,
                       cache_queries=False)
    pool, router = loras.adapters, loras.router
    if args.chat_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"--chat_format chat_template: the tokenizer of {args.base_model} has no chat template; use --chat_format template.")
    lock = threading.Lock()
    metrics = ServerMetrics()
    ctx = context_length_of(model, tokenizer)
    refusal = None
    if on_vllm:
        scheduler = vllm_scheduler(args, pool, router, metrics, eos_ids(tokenizer, model))
        if not args.vllm_logprobs:
            refusal = ("Prompt logprobs (echo with logprobs, prompt_logprobs) are not served with --engine vllm: vLLM's CPU build "
                       "kills its engine on such requests when LoRA is enabled. On a vLLM build that serves them, restart this "
                       "server with --vllm_logprobs.")
    else:
        live = LiveComposition(pool, grouped=getattr(args, "lora_kernel", "grouped") == "grouped") if pool is not None else None
        decoder = BatchDecoder(model, tokenizer, live,
                               eos_ids=eos_ids(tokenizer, model), context_length=ctx, tokenizer_lock=lock)
        decoder.mixed_steps = decoder.mixed_steps and args.prefill == "mixed"
        decoder.max_prefill_tokens = args.max_prefill_tokens or None
        with decoder.composition.active() if decoder.composition is not None else nullcontext():
            decoder.check_model()
        # Embedding ahead on a CPU that also decodes: the two threads share the cores, and the step waits on the
        # embedding's operators (docs/serving.md, "Scheduling").
        ahead = args.embed_ahead == "on" or (args.embed_ahead == "auto" and decoder.device.type != "cpu")
        scheduler = Scheduler(decoder, pool=pool, router=router, metrics=metrics, max_batch_size=args.max_batch_size,
                              max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, policy=args.batching, embed_ahead=ahead)
    defaults = Defaults(composition=args.eval_type, lora_num=args.lora_num, weighting=args.weighting, softmax_temperature=args.temperature,
                        max_tokens=args.max_new_tokens, max_tokens_cap=args.max_tokens_cap, max_logprobs=args.max_logprobs,
                        prompt_logprobs_refusal=refusal, chat_format=args.chat_format, prompt_format=args.prompt_format,
                        routing=args.routing, lorauter_k=args.lorauter_k, lorauter_temperature=args.lorauter_temperature)
    if pool is not None and (args.routing == "lorauter" or args.task_library):
        if on_vllm:
            raise InputError("--routing lorauter scores the adapters on the model in this process; serve it with --engine local.")
        from utils.retrieval import embedding_cache_dir as cache_of
        from utils.task_scores import build_task_index

        if args.task_scorer != "loglik":
            raise InputError("--routing lorauter on a server scores adapters loaded at run time between decoding steps, which takes "
                             "--task_scorer loglik.")
        router.tasks, _, _ = build_task_index(session, entries, args, pool, tokenizer, prompter, args.device, cache_of(args.embedding_cache))
    if router is not None and router.embedder is not None:
        # every request embeds its input: the sentence model loads now, not inside the first request's latency
        router.embedder.model
    logger.info("Loaded %s with %d adapters in %.1f s (context %d tokens)", args.base_model, len(entries), time.time() - t0, ctx)
    engine = Engine(tokenizer=tokenizer, model=model, loras=loras, prompter=prompter,
                    scheduler=scheduler, metrics=metrics, context_length=ctx, defaults=defaults, model_name=args.base_model,
                    tokenizer_lock=lock)
    if router.tasks is not None:
        from utils.serving.task_scoring import LiveScoring

        # adapters loaded at run time are scored through the decoder's own composition, between decoding steps
        router.tasks.scorer.composition = decoder.composition
        engine.scoring = LiveScoring(engine, metrics)
    return engine


def vllm_scheduler(args, pool, router, metrics, eos):
    """The scheduler of ``--engine vllm``: routing here, generation on the vLLM server(s) at ``--vllm_url``."""
    from utils.serving.vllm_scheduler import VllmScheduler
    from utils.vllm_engine import EngineUnavailable, Replicas, engine_settings

    composed = engine_settings(args)["composed_dir"]
    replicas = Replicas.from_args(args, pool, connections=args.max_batch_size + 8)
    try:
        logger.info("Generation on vLLM at %s (base model served as %r; compositions under %s)", ", ".join(replicas.urls),
                    replicas.base_name(), composed)
    except EngineUnavailable as err:  # it may still be starting: requests get 503 until it answers
        logger.warning("%s Requests get 503 until it answers.", err.message)
    return VllmScheduler(replicas, eos_ids=eos, pool=pool, router=router, metrics=metrics, max_batch_size=args.max_batch_size,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, embed_ahead=args.embed_ahead != "off")
