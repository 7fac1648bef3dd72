"""Stage: the ways an evaluation run generates. One object per way, each with the same interface, so that
:func:`utils.evaluation.execute` loops over batches and writes rows without asking which way it is:

    generate(batch, prompts) -> (texts, generated token counts)   rows ``batch`` (indices), their prompts
    record(i) -> dict                                             what row i's result records of its routing
    describe() -> dict                                            the results file's ``meta.engine``
    close()                                                       release what the way holds

- :class:`OnModel`: the retrieved (or chosen) adapters of each row composed per sample inside one batch, on the
  model in this process (:func:`utils.composition.compose`): mixture, fusion, selection and the baselines that
  end in a composition (Adapter Soup, LoraHub's vectors); or the base model without adapters.
- :class:`Arrow`: PEFT's Arrow, which routes every token inside the model; with ``--ood`` one Arrow model per
  left-out adapter, built when its rows' batches come.
- :class:`OnVllm`: each row's composition registered with a vLLM server as one LoRA, the batch's rows sent
  together (:mod:`utils.vllm_engine`).
"""

from __future__ import annotations

import contextlib
import logging

from utils.data import InputError

logger = logging.getLogger(__name__)
LOCAL = {"engine": "local"}


def routed(routing, i: int) -> dict:
    """Row i's routing as its result records it: adapters, weights, similarities (``scores``) and extra fields."""
    out = {"adapters": routing.adapters[i], "weights": [float(x) for x in routing.weights[i]]}
    if routing.similarities[i] is not None:
        out["scores"] = [float(x) for x in routing.similarities[i]]
    out.update(routing.extra[i])
    return out


class OnModel:
    """The model in this process: each row's adapters composed per sample inside one batch
    (:class:`utils.composition.LiveComposition`, the server's per-row composition), or the base model as loaded for a
    run without adapters (``adapter_pool`` None)."""

    def __init__(self, args, session, model, tokenizer, adapter_pool, routing):
        from utils.composition import LiveComposition

        self.args, self.session, self.model, self.tokenizer = args, session, model, tokenizer
        self.adapter_pool, self.routing = adapter_pool, routing
        self.live = LiveComposition(adapter_pool) if adapter_pool is not None else None

    def generate(self, batch: list[int], prompts: list[str]):
        from utils.generation import generate_batch

        r, args = self.routing, self.args
        if self.adapter_pool is None:
            with self.session.without_adapters():
                return generate_batch(self.model, self.tokenizer, prompts, args.max_new_tokens, args.max_input_tokens)
        with self.live.active() as model:
            return generate_batch(model, self.tokenizer, prompts, args.max_new_tokens, args.max_input_tokens, self.live,
                                  [(r.adapters[i], r.weights[i], r.modes[i]) for i in batch])

    def record(self, i: int) -> dict:
        return routed(self.routing, i)

    def describe(self) -> dict:
        return dict(LOCAL)

    def close(self) -> None:
        pass


class Arrow:
    """PEFT's Arrow over the pool; with ``--ood``, over the pool without the batch's left-out adapter
    (``group_of[i]``: the adapter row i leaves out, None for none)."""

    def __init__(self, args, session, pool, tokenizer, group_of: list):
        self.args, self.session, self.pool, self.tokenizer, self.group_of = args, session, pool, tokenizer, group_of
        self.stack = contextlib.ExitStack()
        self.group, self.model = object(), None

    def generate(self, batch: list[int], prompts: list[str]):
        from utils.generation import generate_batch

        args = self.args
        if self.group_of[batch[0]] != self.group:  # a new left-out adapter: PEFT's Arrow over the rest of the pool
            self.stack.close()
            self.group = self.group_of[batch[0]]
            self.model = self.stack.enter_context(self.session.arrow(
                [e for e in self.pool if e.name != self.group], args.arrow_top_k, args.arrow_temperature,
                args.arrow_general_adapters, args.seed))
        return generate_batch(self.model, self.tokenizer, prompts, args.max_new_tokens, args.max_input_tokens)

    def record(self, i: int) -> dict:
        out = {"adapters": [], "weights": []}
        if self.group_of[i] is not None:
            out["arrow_left_out"] = self.group_of[i]
        return out

    def describe(self) -> dict:
        return dict(LOCAL)

    def close(self) -> None:
        self.stack.close()


class OnVllm:
    """A run's generation on a vLLM server (``--engine vllm``): each row's composition registered as one LoRA
    (:mod:`utils.vllm_engine`), the rows of a batch sent together, vLLM batching them."""

    def __init__(self, args, adapter_pool, tokenizer, routing):
        from utils.vllm_engine import EngineUnavailable, Replicas, engine_settings

        self.args, self.tokenizer, self.routing = args, tokenizer, routing
        self.settings = engine_settings(args)
        self.replicas = Replicas.from_args(args, adapter_pool)
        try:
            self.base = self.replicas.base_name()
        except EngineUnavailable as err:
            raise InputError(f"--engine vllm: {err.message}") from err
        logger.info("Generating on vLLM at %s (base model %r)", ", ".join(self.replicas.urls), self.base)

    def generate(self, batch: list[int], prompts: list[str]):
        from utils.vllm_compositions import RankTooLarge
        from utils.vllm_engine import EngineRefused, EngineUnavailable, generate_rows

        r = self.routing
        compositions = [([], [], "mixture") if r is None else (r.adapters[i], r.weights[i], r.modes[i]) for i in batch]
        enc = self.tokenizer(prompts, add_special_tokens=True).input_ids
        if self.args.max_input_tokens is not None:
            enc = [ids[-self.args.max_input_tokens:] for ids in enc]
        try:
            return generate_rows(self.replicas, enc, compositions, self.args.max_new_tokens, self.tokenizer, concurrency=max(len(prompts), 1))
        except (EngineUnavailable, RankTooLarge, EngineRefused) as err:
            raise InputError(f"--engine vllm: {err.message} The rows finished so far are kept; rerun the same command to resume.") from err

    def record(self, i: int) -> dict:
        return routed(self.routing, i)

    def describe(self) -> dict:
        out = dict(self.settings, vllm_model=self.base)
        out.update(self.replicas.describe())
        out.pop("in_flight_per_server", None)
        return out

    def close(self) -> None:
        pass
