"""Stage: evaluation. One run over a mixed-task data file: plan, prepare, route, generate, write.

A run is checked whole before any model loads (:func:`prepare` gives a :class:`Plan`), then :func:`execute` loads
what the :class:`utils.session.Session` does not hold yet, asks :mod:`utils.routing` which adapters and weights
each row uses (Arrow routes inside the model instead), generates in length-sorted batches with per-sample
composition, checkpoints every batch, and writes one self-describing results file atomically.

Several runs in one process (``main.py --runs``) are :mod:`utils.sweep`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.data import InputError
from utils.retrieval import embedding_cache_dir

EVAL_TYPES = ("mixture", "fusion", "base", "soup", "arrow", "lorahub", "lorauter")
# Flags of one evaluation type only; the results of other types do not record them.
OWN_FLAGS = {
    "soup": ("soup",),
    "arrow": ("arrow_top_k", "arrow_temperature", "arrow_general_adapters"),
    "lorahub": ("lorahub_scope", "lorahub_examples", "lorahub_budget", "lorahub_candidates", "lorahub_optimizer", "lorahub_l1",
                "lorahub_dtype", "task_library"),
    "lorauter": ("task_library", "lorauter_k", "lorauter_temperature", "task_scorer", "task_search", "task_rows",
                 "task_candidates"),
}

logger = logging.getLogger(__name__)


def validate(args: argparse.Namespace) -> None:
    """Checks of the flags alone (files are checked when read)."""
    from utils.data import InputError
    from utils.flags import check_shared

    if not args.data_path:
        raise InputError("--data_path is required, e.g. --data_path data/bigbench/combined_test.json")
    if not args.res_path:
        raise InputError("--res_path is required, e.g. --res_path results/mixture.json")
    if args.res_dir or args.force:
        raise InputError("--res_dir and --force go with --runs (a sweep); a single run writes --res_path.")
    check_shared(args)
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1 (got {args.batch_size}).")
    if args.max_input_tokens is not None and args.max_input_tokens < 1:
        raise InputError(f"--max_input_tokens must be at least 1 (got {args.max_input_tokens}).")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1 (got {args.limit}).")
    if args.best_selection and args.eval_type not in ("mixture", "fusion"):
        raise InputError(f"--best_selection uses the row's own adapter alone; it cannot go with --eval_type {args.eval_type}.")
    if args.eval_type == "arrow" and args.arrow_temperature <= 0:
        raise InputError(f"--arrow_temperature must be above 0 (got {args.arrow_temperature}).")
    if args.eval_type == "lorahub":
        if args.ood and args.lorahub_scope == "all":
            raise InputError("--ood with --lorahub_scope all: one vector serves every row, so no row's own adapter can be left "
                             "out of it; use --lorahub_scope task --ood (each task's vector learned without its own adapter).")
        for flag, low in (("lorahub_examples", 1), ("lorahub_budget", 1)):
            if getattr(args, flag) < low:
                raise InputError(f"--{flag} must be at least {low} (got {getattr(args, flag)}).")
        if args.lorahub_l1 < 0:
            raise InputError(f"--lorahub_l1 must be 0 or more (got {args.lorahub_l1}).")
    if args.engine == "vllm" and args.eval_type in ("arrow", "lorahub", "lorauter"):
        raise InputError(f"--eval_type {args.eval_type} needs the model in this process ("
                         + {"arrow": "Arrow routes every token inside the model", "lorahub": "LoraHub's search evaluates its loss here",
                            "lorauter": "LoRAuter scores the adapters on its tasks here"}[args.eval_type]
                         + "); run it with --engine local.")
    if args.eval_type == "lorauter":
        if args.lorauter_k < 1:
            raise InputError(f"--lorauter_k must be at least 1 (got {args.lorauter_k}).")
        if args.lorauter_temperature <= 0:
            raise InputError(f"--lorauter_temperature must be above 0 (got {args.lorauter_temperature}).")
        if args.task_rows is not None and args.task_rows < 1:
            raise InputError(f"--task_rows must be at least 1 (got {args.task_rows}).")
        if args.task_candidates < 0:
            raise InputError(f"--task_candidates must be 0 (every adapter) or more (got {args.task_candidates}).")
    if args.best_selection and args.ood:
        raise InputError("--best_selection uses the row's own adapter, which --ood removes; drop one of them.")


def resolved_settings(args: argparse.Namespace) -> dict:
    """The settings that decide the predictions (written into the results file and checkpoint)."""
    s = {k: v for k, v in vars(args).items()
         if k not in ("log_level", "no_resume", "settings", "batch_size", "device", "device_map", "embedding_cache",
                      "max_loras", "max_cpu_loras", "eager_load", "engine", "vllm_url", "vllm_api_key", "vllm_model",
                      "vllm_max_lora_rank", "vllm_timeout", "composed_dir", "max_composed", "linear_kernels",
                      "runs", "res_dir", "force", "task_scores")}
    mine = set(OWN_FLAGS.get(args.eval_type, ()))
    for eval_type, keys in OWN_FLAGS.items():
        if args.eval_type != eval_type:
            for key in set(keys) - mine:
                s.pop(key, None)
    if args.best_selection:
        s["lora_num"] = 1
    # The contents, not only the names, of the input files decide the predictions.
    s["data_sha256"] = file_sha256(args.data_path)
    if args.eval_type != "base":
        s["pool_sha256"] = file_sha256(args.config_path)
    return s


def file_sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Plan:
    """One run, checked and ready: its flags, rows, pool entries and checkpoint (no model loaded yet)."""

    args: argparse.Namespace
    rows: list
    prompter: object
    pool: list
    k: int
    settings: dict
    checkpoint: object
    done: dict
    t_start: float
    cleanup: list = field(default_factory=list)  # called once the results file is written
    seconds: dict = field(default_factory=dict)  # what execute() spent: generation, and LoraHub's search


def prepare(args: argparse.Namespace) -> Plan:
    """Every check of one run that needs no model: flags, data, pool config, output path, checkpoint."""
    from utils.data import InputError, load_pool_config, load_rows
    from utils.distributed import dist_info
    from utils.prompter import Prompter
    from utils.results import Checkpoint, check_writable

    from utils.flags import resolve_device

    t_start = time.time()
    validate(args)
    resolve_device(args.device)  # an unknown or absent device fails here, before any model loads
    rows = load_rows(args.data_path)
    if args.limit:
        rows = rows[: args.limit]
    prompter = Prompter(args.template)  # an unknown template fails here, before any model loads
    k = 1 if args.best_selection else args.lora_num
    pool = []
    if args.eval_type != "base":
        pool = load_pool_config(args.config_path, args.adapter_pattern)
        names = {e.name for e in pool}
        if args.best_selection:
            missing = sorted({r["task"] for r in rows} - names)
            if missing:
                raise InputError(f"--best_selection needs each row's own adapter, but the pool has none for tasks {missing}; add them to {args.config_path}.")
        elif args.eval_type in ("mixture", "fusion") or (args.eval_type == "lorahub" and args.lorahub_candidates == "retrieved"):
            carded = [e for e in pool if e.samples]
            if not carded:
                raise InputError(f"--eval_type {args.eval_type} retrieves adapters by their cards, but no entry of {args.config_path} "
                                 "has a 'sample' card; add cards, or route through tasks with --eval_type lorauter.")
            own_in_pool = args.ood and any(r["task"] in {e.name for e in carded} for r in rows)
            available = len(carded) - (1 if own_in_pool else 0)
            if k > available:
                raise InputError(
                    f"--lora_num {k} is larger than the {available} candidate adapters"
                    + (" left after OOD exclusion" if own_in_pool else "") + f" in {args.config_path}; lower --lora_num."
                )
        check_baseline(args, rows, pool)
    check_writable(args.res_path)
    settings = resolved_settings(args)
    dist = dist_info()
    checkpoint = Checkpoint(args.res_path, settings, shard=dist.rank if dist.enabled else None)
    if args.no_resume:
        checkpoint.remove()
    done = checkpoint.load()
    return Plan(args, rows, prompter, pool, k, settings, checkpoint, done, t_start)


def check_baseline(args: argparse.Namespace, rows: list[dict], pool: list) -> None:
    """What the soup / arrow / lorahub evaluation types need of the pool, checked before any model loads."""
    from utils.data import InputError

    names = {e.name for e in pool}
    if args.eval_type == "soup" and args.soup == "domain":
        blank = [e.name for e in pool if not e.domain]
        if blank:
            raise InputError(f"--eval_type soup groups adapters by their 'domain', but {', '.join(blank[:8])} in {args.config_path} "
                             "have none; add domains, or average all adapters with --soup all.")
    if args.eval_type in ("soup", "arrow") and args.ood and len(pool) == 1 and any(r["task"] in names for r in rows):
        raise InputError(f"--ood removes each row's own adapter, and the pool in {args.config_path} has only that one; add adapters.")
    if args.eval_type == "arrow":
        from utils.baselines.arrow import check_arrow_pool

        own_in_pool = args.ood and any(r["task"] in names for r in rows)
        check_arrow_pool(pool, args.arrow_top_k, args.arrow_general_adapters, left_out=1 if own_in_pool else 0)
    if args.eval_type == "lorauter":
        from utils.task_library import task_library

        if not task_library(pool, args.task_library):
            raise InputError(f"--eval_type lorauter routes through tasks, but no entry of {args.config_path} has a card with targets "
                             "and no --task_library was given; add 'sample' rows with 'targets', or a task library.")
    if args.eval_type == "lorahub":
        from utils.baselines.lorahub import few_shot_examples

        if args.lorahub_scope == "task":
            missing = sorted({r["task"] for r in rows} - names)
            if missing:
                raise InputError(f"--lorahub_scope task learns each task's vector from that task's labelled samples in the pool config, "
                                 f"but {args.config_path} has no entry for tasks {missing[:8]}; use --lorahub_scope all.")
            tasks = {r["task"] for r in rows}
            few_shot_examples([e for e in pool if e.name in tasks], args.lorahub_examples)
            if args.ood and len(pool) < 2:
                raise InputError("--lorahub_scope task --ood needs at least two adapters in the pool.")
        else:
            from utils.baselines.lorahub import labelled_entries
            from utils.task_library import load_task_library

            labelled = labelled_entries(pool, load_task_library(args.task_library) if args.task_library else [])
            if not labelled:
                raise InputError(f"--eval_type lorahub learns from labelled examples, but no entry of {args.config_path} has a card "
                                 "with targets; give them cards, or --task_library FILE.")
            few_shot_examples(labelled, args.lorahub_examples)


def routes_of(plan: Plan) -> list:
    """What each row asks of the router (:class:`utils.routing.Route`), from the run's flags."""
    from utils.routing import Route

    args, rows = plan.args, plan.rows
    if args.eval_type == "base":
        return [Route("base") for _ in rows]
    if args.best_selection:
        return [Route("own", task=r["task"], mode=args.eval_type) for r in rows]
    own = [(r["task"],) if args.ood else () for r in rows]
    if args.eval_type == "soup":
        return [Route("soup" if args.soup == "domain" else "soup_all", exclude=e) for e in own]
    if args.eval_type == "lorauter":
        return [Route("lorauter", k=args.lorauter_k, temperature=args.lorauter_temperature, exclude=e) for e in own]
    return [Route("auto", k=plan.k, weighting=args.weighting, temperature=args.temperature, exclude=e, mode=args.eval_type)
            for e in own]


def route(plan: Plan, session, adapter_pool, tokenizer, device: str):
    """The :class:`utils.routing.Routing` of every row: retrieval, or the baseline's own choice."""
    from utils.pool import build_pool
    from utils.routing import Route

    args, rows, pool = plan.args, plan.rows, plan.pool
    retrieves = (args.eval_type in ("mixture", "fusion") and not args.best_selection) \
        or (args.eval_type == "soup" and args.soup == "domain") \
        or (args.eval_type == "lorahub" and args.lorahub_candidates == "retrieved")
    loras = build_pool(session, pool, args, device=device, weights=False, retrieval=retrieves,
                       cache_dir=embedding_cache_dir(args.embedding_cache))
    router, retriever = loras.router, loras.retriever
    queries = [r["inputs"] for r in rows]
    if args.eval_type == "lorauter":
        from utils.task_scores import build_task_index

        router.tasks, matrix, seconds = build_task_index(session, pool, args, adapter_pool, tokenizer, plan.prompter, device,
                                                         embedding_cache_dir(args.embedding_cache))
        routing = router.route(queries, routes_of(plan))
        routing.meta["lorauter"] = dict(matrix.as_json(), seconds=round(seconds, 2), scorer=args.task_scorer, search=args.task_search)
        return routing
    if args.eval_type != "lorahub":
        return router.route(queries, routes_of(plan))
    from dataclasses import asdict

    from utils.baselines.lorahub import WeightStore, learn_scope_vectors
    from utils.results import fingerprint

    store = WeightStore(args.res_path, fingerprint(plan.settings))
    t0 = time.time()
    from utils.task_library import load_task_library

    library = load_task_library(args.task_library) if args.task_library else []
    key_of = learn_scope_vectors(args, rows, pool, plan.k, plan.prompter, adapter_pool, tokenizer, retriever, store, library)
    vectors = store.vectors
    plan.cleanup.append(store.remove)
    routing = router.route(queries, [Route("mix", mix=tuple(zip(vectors[key].adapters, vectors[key].weights)), mode="fusion")
                                     for key in key_of])
    routing.extra = [{"lorahub_scope": key} for key in key_of]
    routing.meta = {"lorahub": {"search_seconds": round(time.time() - t0, 2), "vectors": {k2: asdict(v) for k2, v in vectors.items()}}}
    return routing


def fitting_batches(batch: list[int], adapters: list[list[str]], max_loras: int) -> list[list[int]]:
    """``batch`` cut, in order, into batches whose rows use at most ``max_loras`` distinct adapters together."""
    out, current, used = [], [], set()
    for i in batch:
        need = set(adapters[i])
        if len(need) > max_loras:
            raise InputError(f"Row {i} uses {len(need)} adapters, over --max_loras {max_loras}; raise --max_loras to at least {len(need)}.")
        if current and len(used | need) > max_loras:
            out.append(current)
            current, used = [], set()
        current.append(i)
        used |= need
    if current:
        out.append(current)
    return out


def form_batches(args, tokenizer, prompts: list[str], group_of: list) -> list[list[int]]:
    """Length-sorted batches of row indices, formed within each group (``group_of[i]``: Arrow's left-out adapter).

    Batches are formed over all rows (not only the unfinished ones), so that a resumed run generates each remaining
    row in the same batch, with the same padding, as an uninterrupted run would. Arrow with ``--ood`` needs one model
    per left-out adapter, so its batches are formed within each task's rows.
    """
    from utils.generation import length_sorted_batches

    lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
    groups: dict = {}
    for i, g in enumerate(group_of):
        groups.setdefault(g, []).append(i)
    batches = []
    for members in groups.values():
        batches += [[members[j] for j in b] for b in length_sorted_batches([lengths[i] for i in members], args.batch_size)]
    return batches


def execute(plan: Plan, session) -> Path:
    """Load what ``session`` does not hold yet, retrieve, generate, and write the results file atomically."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    from utils.distributed import barrier, dist_info, init, my_batches
    from utils.flags import default_dtype
    from utils.results import Checkpoint, run_metadata, write_json_atomic

    args, rows, pool, settings, checkpoint, done = plan.args, plan.rows, plan.pool, plan.settings, plan.checkpoint, plan.done
    arrow = args.eval_type == "arrow"
    if done:
        logger.info("Resuming: %d rows already in %s", len(done), checkpoint.path)
    logger.info("Settings: %s", json.dumps(settings))

    transformers.set_seed(args.seed)
    dist = dist_info()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dist.enabled:
        init(dist, device.startswith("cuda"))
        if device == "cuda":
            device = f"cuda:{dist.local_rank}"
        logger.info("Process %d of %d on %s", dist.rank, dist.world_size, device)
    dtype = args.dtype or default_dtype(device)
    on_vllm = args.engine == "vllm"
    # With vLLM generating, this process needs the model's architecture only: a skeleton on the meta device.
    tokenizer, model = session.base(args.base_model, dtype, "meta" if on_vllm else device, None if on_vllm else args.device_map,
                                    args.linear_kernels)
    adapter_pool = (session.adapter_pool(pool, args.max_loras, args.max_cpu_loras, args.eager_load)
                    if args.eval_type not in ("base", "arrow") else None)

    # Routing for every row, batched (Arrow routes each token inside the model instead).
    t0 = time.time()
    routing = None if arrow else route(plan, session, adapter_pool, tokenizer, device)
    t_retrieval = time.time() - t0
    if adapter_pool is not None and routing is not None:
        # The adapters the rows retrieved are read (and checked) before any row is generated; the others never are.
        adapter_pool.load(dict.fromkeys(n for names in routing.adapters for n in names))

    prompts = [plan.prompter.generate_prompt(r["inputs"]) for r in rows]
    names = {e.name for e in pool}
    group_of = [r["task"] if arrow and args.ood and r["task"] in names else None for r in rows]
    batches = form_batches(args, tokenizer, prompts, group_of)
    if adapter_pool is not None and routing is not None and not on_vllm:
        batches = [sub for b in batches for sub in fitting_batches(b, routing.adapters, adapter_pool.max_loras)]
    way = generation_way(plan, session, model, tokenizer, adapter_pool, routing, group_of)
    batches = my_batches(batches, dist)
    batches = [b for b in ([i for i in batch if i not in done] for batch in batches) if b]
    checkpoint.start(done)
    t0, n_tokens = time.time(), 0
    try:
        for batch in tqdm(batches, desc=f"Generating ({args.eval_type})", unit="batch"):
            texts, counts = way.generate(batch, [prompts[i] for i in batch])
            n_tokens += sum(counts)
            out = []
            for i, text in zip(batch, texts):
                row = dict(rows[i])
                row.update(index=i, predicted_answer=text)
                row.update(way.record(i))
                out.append(row)
                done[i] = row
            checkpoint.append(out)
    finally:
        way.close()
    t_gen = time.time() - t0
    plan.seconds["generation"] = t_gen
    if routing is not None and "lorahub" in routing.meta:
        plan.seconds["search"] = t_retrieval

    shards = []
    if dist.enabled:  # every rank has finished its batches: rank 0 merges the checkpoints
        barrier(dist)
        if not dist.is_main:
            return Path(args.res_path)
        shards = [Checkpoint(args.res_path, settings, shard=r) for r in range(dist.world_size)]
        done = {i: row for shard in shards for i, row in shard.load().items()}
        missing = [i for i in range(len(rows)) if i not in done]
        if missing:
            raise RuntimeError(f"Merging the per-process checkpoints lacks rows {missing[:10]}; rerun the same command to finish them.")
    meta = run_metadata(args.seed)
    meta["world_size"] = dist.world_size
    meta["batch_size"] = args.batch_size
    meta["timing_s"] = {"retrieval": round(t_retrieval, 3), "generation": round(t_gen, 3), "total": round(time.time() - plan.t_start, 3)}
    meta["generated_tokens"] = n_tokens
    meta["device"], meta["dtype"] = ("vllm", dtype) if on_vllm else (device, dtype)
    meta["engine"] = way.describe()
    if not on_vllm:
        meta["linear_kernels"] = getattr(model, "linear_kernels", "torch")
    if routing is not None:
        meta.update({k: v for k, v in routing.meta.items() if k != "retrieval_s"})
    result = {"format": "lora_retriever.results/1", "settings": settings, "meta": meta,
              "rows": [{k2: v for k2, v in done[i].items() if k2 != "index"} for i in range(len(rows))]}
    write_json_atomic(args.res_path, result)
    checkpoint.remove()
    for shard in shards:
        shard.remove()
    for cleanup in plan.cleanup:
        cleanup()
    logger.info("Wrote %d rows to %s (retrieval %.2f s, generation %.1f s, %d new tokens)", len(rows), args.res_path, t_retrieval, t_gen, n_tokens)
    return Path(args.res_path)


def generation_way(plan: Plan, session, model, tokenizer, adapter_pool, routing, group_of: list):
    """The object that generates this run's rows (:mod:`utils.evaluation_engines`)."""
    from utils import evaluation_engines as ways

    args = plan.args
    if args.engine == "vllm":
        return ways.OnVllm(args, adapter_pool, tokenizer, routing)
    if args.eval_type == "arrow":
        return ways.Arrow(args, session, plan.pool, tokenizer, group_of)
    return ways.OnModel(args, session, model, tokenizer, adapter_pool, routing)


def run(args: argparse.Namespace, session=None) -> Path:
    """One run: check everything, load each stage once (or reuse ``session``'s), evaluate, write the results."""
    from utils.session import Session

    return execute(prepare(args), session or Session())
