"""Serve a LoRA pool over an OpenAI-compatible HTTP API: every request gets the adapters retrieved for its input.

    python serve.py                                    # embedded default, http://127.0.0.1:8000 (page at /)
    python serve.py --settings config/paper_llama2_7b.json --port 8000 --device cuda
    python serve.py --engine vllm --vllm_url http://127.0.0.1:8100     # vLLM generates (bench/start_vllm.sh starts it)

Requests with different adapters, weights and compositions run in one batch (per-sample composition); new
requests join the running batch between decoding steps and finished ones leave it (continuous batching).

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "auto", "prompt": "Is this sarcastic? ...", "max_tokens": 32}'

The model, pool config and retriever load once, at start-up (each adapter's weights when retrieval first picks it);
every flag and file is checked before they load. Adapters can be loaded and unloaded while serving
(POST /v1/load_lora_adapter, /v1/unload_lora_adapter; --pool_state keeps the changes across restarts), and a new
task's examples become an adapter trained while serving (POST /v1/adapters/train).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

logger = logging.getLogger("serve")


def build_parser() -> argparse.ArgumentParser:
    from utils import flags
    from utils.serving.request_scheduler import POLICIES
    from utils.serving.serving_engine import CHAT_FORMATS, PROMPT_FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=flags.HelpFormatter)
    a = p.add_argument
    flags.add_model_flags(p)
    flags.add_pool_flags(p)
    flags.add_retrieval_flags(p)
    flags.add_composition_flags(p, ("mixture", "fusion"))
    a("--routing", default="retrieval", choices=("retrieval", "lorauter"),
      help="what model 'auto' does by default (a request's 'routing' field overrides it): retrieval of the top-k adapters by "
           "their cards, or lorauter, through the nearest tasks of the task library to their best adapters")
    flags.add_task_routing_flags(p)
    flags.add_prompt_flags(p)
    a("--no_adapters", action="store_true", help="serve the base model alone (no pool, no retrieval)")
    flags.add_engine_flags(p)
    a("--vllm_logprobs", action="store_true",
      help="with --engine vllm: serve prompt logprobs (echo with logprobs, prompt_logprobs) through vLLM; off by default because "
           "vLLM's CPU build kills its engine on them when LoRA is enabled")
    # HTTP.
    a("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only; 0.0.0.0 to serve a network)")
    a("--port", type=int, default=8000, help="TCP port")
    a("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: $LORA_RETRIEVER_API_KEY, else none)")
    a("--max_body_bytes", type=int, default=1 << 20, help="largest request body accepted")
    a("--max_tokens_cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    a("--max_logprobs", type=int, default=20, help="most top alternatives a request may ask for per token (logprobs, top_logprobs)")
    # The pool at run time.
    a("--adapter_root", action="append", default=None,
      help="folder that POST /v1/load_lora_adapter may read adapters from (repeatable; default: the folders of the pool "
           "config's adapters); paths outside it, through '..' or symlinks included, get 403")
    a("--pool_state", default=None,
      help="JSON file recording runtime loads and unloads (written atomically); a restart with it comes back with the same pool")
    # Growing the pool from examples (POST /v1/adapters/train).
    a("--max_training_jobs", type=int, default=1, help="training jobs that run at once; more wait in the queue")
    a("--max_training_queue", type=int, default=8, help="training jobs waiting at most; more get 429")
    a("--training_threads", type=int, default=1, help="CPU threads of a training process (the rest serve)")
    a("--training_nice", type=int, default=10, help="niceness added to a training process (0: the server's own CPU priority)")
    a("--training_card_size", type=int, default=20, help="examples of a job held back as its adapter's card (at most a quarter)")
    a("--training_root", default=None, help="folder trained adapters are written to (default: the first --adapter_root)")
    a("--max_train_body_bytes", type=int, default=32 << 20, help="largest body POST /v1/adapters/train accepts")
    # Batching.
    a("--max_batch_size", type=int, default=32, help="rows decoded together at most")
    a("--max_wait_ms", type=float, default=10.0, help="when idle, how long the first request waits for others to prefill with it")
    a("--max_queue", type=int, default=256, help="requests waiting at most; more get 429 with Retry-After")
    a("--embed_ahead", default="auto", choices=("auto", "on", "off"),
      help="embed each routed request's query on a thread of its own as it arrives (on), or on the decoding thread when it is "
           "routed (off); auto: off when the model decodes on the CPU, whose cores the two threads would share, on otherwise")
    a("--prefill", default="mixed", choices=("mixed", "separate"),
      help="mixed: requests joining a running batch are prefilled inside its next decoding step's forward (one read of the "
           "weights for both); separate: in a forward of their own before the step")
    a("--max_prefill_tokens", type=int, default=512,
      help="with --prefill mixed, prompt tokens one step prefills at most: a longer prompt is prefilled over several steps "
           "(chunked), so that the running requests wait at most about that many tokens' compute per step; 0: no cap")
    a("--lora_kernel", default="grouped", choices=("grouped", "per_row"),
      help="how a decoding step's LoRA products are computed: grouped: a batch of mixtures that shares few enough adapters "
           "multiplies every row by its distinct adapters once per module, each row's weights as a mask (falling back to "
           "per_row otherwise); per_row: each row by its own stacked factors")
    a("--batching", default="continuous", choices=POLICIES,
      help="continuous: requests join and leave the running batch at every step; dynamic: a batch runs to its end before "
           "the next forms; same_adapters: a batch holds only requests with identical adapters (what one-adapter servers do)")
    # Prompts.
    a("--chat_format", default="template", choices=CHAT_FORMATS,
      help="chat prompts: the --template (alpaca; the format the embedded pool was trained on) or the tokenizer's chat template")
    a("--prompt_format", default="template", choices=PROMPT_FORMATS,
      help="completion prompts: wrapped in --template as main.py does, or raw text")
    flags.add_settings_flag(p)
    a("--log_level", default="INFO", help="logging level")
    return p


def validate(args) -> None:
    from utils.data import InputError
    from utils.flags import check_shared, default_dtype, resolve_device

    check_shared(args)
    checks = [("--max_batch_size", args.max_batch_size, 1),
              ("--max_queue", args.max_queue, 1), ("--max_body_bytes", args.max_body_bytes, 256), ("--max_tokens_cap", args.max_tokens_cap, 1),
              ("--max_logprobs", args.max_logprobs, 0), ("--max_training_jobs", args.max_training_jobs, 1),
              ("--max_training_queue", args.max_training_queue, 1), ("--training_threads", args.training_threads, 1),
              ("--training_nice", args.training_nice, 0), ("--training_card_size", args.training_card_size, 1),
              ("--max_train_body_bytes", args.max_train_body_bytes, 256), ("--max_prefill_tokens", args.max_prefill_tokens, 0)]
    for flag, value, low in checks:
        if value < low:
            raise InputError(f"{flag} must be at least {low} (got {value}).")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be between 1 and 65535 (got {args.port}).")
    if args.max_wait_ms < 0:
        raise InputError(f"--max_wait_ms must be 0 or more (got {args.max_wait_ms}).")
    if args.max_new_tokens > args.max_tokens_cap:
        raise InputError(f"--max_new_tokens {args.max_new_tokens} (the default max_tokens) exceeds --max_tokens_cap {args.max_tokens_cap}; lower one or raise the other.")
    if args.engine == "vllm" and args.batching != "continuous":
        raise InputError(f"--batching {args.batching} applies to --engine local; with --engine vllm, vLLM forms the batches.")
    args.device = resolve_device(args.device)
    args.dtype = args.dtype or default_dtype(args.device)
    if args.api_key is None:
        args.api_key = os.environ.get("LORA_RETRIEVER_API_KEY") or None


def main(argv: list[str] | None = None) -> int:
    from utils.data import InputError
    from utils.flags import MAIN_ONLY_KEYS, parse_with_settings

    try:
        args = parse_with_settings(build_parser(), argv, ignore_keys=MAIN_ONLY_KEYS)
        validate(args)
    except InputError as err:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logger.error("%s", err)
        return 2
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    from utils.serving.http_api import create_app
    from utils.serving.serving_engine import load_engine

    try:
        engine = load_engine(args)
    except InputError as err:
        logger.error("%s", err)
        return 2
    from pathlib import Path

    from utils.serving.pool_admin import PoolAdmin, default_roots

    roots = [Path(r) for r in args.adapter_root] if args.adapter_root else default_roots(engine.entries)
    admin = PoolAdmin(engine, roots, args.pool_state)
    try:
        admin.restore()
    except InputError as err:
        logger.error("%s", err)
        return 2
    training = None
    if engine.pool is not None:
        from utils.serving.training_jobs import TrainingJobs

        root = Path(args.training_root) if args.training_root else (roots[0] if roots else Path("loras"))
        training = TrainingJobs(admin, root, args.base_model, dtype=args.dtype, device=args.device, max_jobs=args.max_training_jobs,
                                max_queue=args.max_training_queue, threads=args.training_threads, nice=args.training_nice,
                                card_size=args.training_card_size)
        if args.training_root:
            admin.roots.append(root.resolve())
    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes, admin=admin, bind_host=args.host,
                     training=training, max_train_body_bytes=args.max_train_body_bytes)
    logger.info("Serving %s with %d adapters on http://%s:%d (web page at /, API at /v1)", args.base_model,
                len(engine.entries), args.host, args.port)
    # uvicorn stops on SIGTERM/SIGINT: it stops accepting, waits for the requests in flight, then the lifespan
    # stops the scheduler once its queue and batch are empty. Afterwards uvicorn re-raises the signal to the handler
    # that was in place before it started; for SIGTERM that is this no-op, so a graceful stop exits with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=str(args.log_level).lower(),
                                           timeout_graceful_shutdown=None))
    server.run()
    logger.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
