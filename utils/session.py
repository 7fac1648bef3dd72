"""What the runs of one process share: the tokenizer and base model, the adapter pool, the retriever.

A sweep (``main.py --run ... --run ...``) evaluates several configurations in one process. Each object
is built on first use and kept while the next run asks for the same settings, so a sweep loads the base
model and the pool's adapters once instead of once per run. A run that asks for other settings gets a
fresh object. The pool reads adapters without injecting anything into the base model, so a different pool
keeps the loaded base model.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager, nullcontext

logger = logging.getLogger(__name__)


class Session:
    def __init__(self):
        self.tokenizer = None
        self.model = None
        self.pool = None
        self._base_key = None
        self._pool_key = None
        self._embedder = None
        self._embedder_key = None
        self._retriever = None
        self._retriever_key = None

    def base(self, name: str, dtype: str, device: str, device_map: str | None, linear_kernels: str = "auto"):
        """(tokenizer, base model), loaded unless the last run used the same ones."""
        from utils.model_loading import load_base_model, load_tokenizer

        key = (name, dtype, device, device_map, linear_kernels)
        if key != self._base_key:
            self._drop_models()
            t0 = time.time()
            self.tokenizer = load_tokenizer(name)
            self.model = load_base_model(name, dtype=dtype, device=device, device_map=device_map, linear_kernels=linear_kernels)
            self._base_key = key
            logger.info("Base model %s loaded in %.1f s", name, time.time() - t0)
        return self.tokenizer, self.model

    def adapter_pool(self, entries, max_loras: int | None = None, max_cpu_loras: int | None = None, eager: bool = False):
        """The :class:`AdapterPool` of ``entries`` on the current base model (call :meth:`base` first)."""
        from utils.adapter_pool import AdapterPool

        if self.model is None:
            raise RuntimeError("Session.base() must load the base model before the adapter pool.")
        key = (tuple((e.name, str(e.path)) for e in entries), max_loras, max_cpu_loras, eager)
        if self.pool is None or key != self._pool_key:
            if self.pool is not None:
                self.pool.close()
            t0 = time.time()
            self.pool = AdapterPool(self.model, entries, max_loras=max_loras, max_cpu_loras=max_cpu_loras, eager=eager)
            self._pool_key = key
            logger.info("Pool of %d adapters ready in %.2f s", len(entries), time.time() - t0)
        return self.pool

    @contextmanager
    def arrow(self, entries, top_k: int, temperature: float, general_paths=None, seed: int = 0):
        """PEFT's Arrow model over ``entries`` on the base model, removed again on exit (see :mod:`utils.baselines.arrow`).

        Arrow injects its own LoRA layers into the base model and removes them again on exit.
        """
        from utils.baselines.arrow import build_arrow_model

        if self.model is None:
            raise RuntimeError("Session.base() must load the base model before Arrow.")
        t0 = time.time()
        model = build_arrow_model(self.model, entries, top_k, temperature, general_paths, seed)
        logger.info("Arrow over %d adapters built in %.1f s", len(entries), time.time() - t0)
        try:
            yield model
        finally:
            model.unload()  # the base model's own layers back in place

    def without_adapters(self):
        """Context in which the base model runs without adapters (for ``--eval_type base``): the pool injects nothing,
        so this is the base model as loaded."""
        return nullcontext()

    def retriever(self, entries, retriever: str, instruction: str, exclude_prompt: bool | None, device: str, cache_dir,
                  adapter_vector: str = "normalized_mean"):
        """A :class:`LoraRetriever` over ``entries``; the embedder and the pool's index are kept across runs."""
        from utils.retrieval import LoraRetriever

        self.embedder(retriever, instruction, exclude_prompt, device, cache_dir)
        rkey = (adapter_vector, tuple((e.name, tuple(str(s) for s in e.samples)) for e in entries))
        if rkey != self._retriever_key:
            self._retriever = LoraRetriever(self._embedder, [e.name for e in entries], [e.samples for e in entries],
                                            adapter_vector=adapter_vector)
            self._retriever_key = rkey
        return self._retriever

    def embedder(self, retriever: str, instruction: str, exclude_prompt: bool | None, device: str, cache_dir):
        """The sentence embedder of retrieval and of the task library, kept across runs."""
        from utils.retrieval import Embedder

        ekey = (retriever, instruction, exclude_prompt, device, str(cache_dir))
        if ekey != self._embedder_key:
            self._embedder = Embedder(retriever, instruction, device=device, exclude_prompt_from_pooling=exclude_prompt,
                                      cache_dir=cache_dir)
            self._embedder_key = ekey
            self._retriever = self._retriever_key = None
        return self._embedder

    def _drop_models(self):
        if self.pool is not None:
            self.pool.close()
        self.tokenizer = self.model = self.pool = None
        self._base_key = self._pool_key = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
