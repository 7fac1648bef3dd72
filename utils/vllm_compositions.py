"""Stage: the compositions registered with a vLLM server (``--engine vllm``; :mod:`utils.vllm_engine`).

Each distinct composition (mode, sorted adapter names with weights rounded to 1e-4, their adapters' paths) is written
once as a standard PEFT directory under ``--composed_dir`` (:func:`utils.composition.materialize`) and registered with
vLLM at run time; past ``--max_composed`` registered ones, the least recently used one that no request is using is
unloaded from vLLM and its directory deleted. A composition over vLLM's ``--max-lora-rank`` is refused
(:class:`RankTooLarge`): a mixture's rank is the sum of its adapters' ranks, a fusion's the largest.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path

from utils.data import InputError
from utils.flags import VLLM_RANKS

logger = logging.getLogger(__name__)


class RankTooLarge(Exception):
    """A composition's rank is over vLLM's ``--max-lora-rank``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise InputError(f"A LoRA of rank {rank} is over vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}); compose fewer adapters.")


def composition_rank(pool, names: list[str], mode: str) -> int:
    """The rank of the one LoRA that composes ``names``: per module, mixture adds the adapters' ranks and fusion takes
    the largest; the largest over modules (what :func:`utils.composition.materialize` writes)."""
    per_module: dict[str, list[int]] = {}
    for n in dict.fromkeys(names) if mode == "fusion" else names:
        for m, (a, _) in pool.weights(n).modules.items():
            per_module.setdefault(m, []).append(a.shape[0])
    if not per_module:
        return 0
    return max((sum(r) if mode == "mixture" else max(r)) for r in per_module.values())


class ComposedAdapters:
    """The compositions registered with one vLLM server (module docstring). Thread-safe.

    Args:
        pool: the :class:`utils.adapter_pool.AdapterPool` the compositions are read from.
        client: the :class:`utils.vllm_engine.VllmClient` of the server.
        composed_dir: where compositions are written (one folder each).
        max_composed: registered compositions kept at most (in-use ones are never unloaded).
        max_rank: vLLM's ``--max-lora-rank``.
        base_model_name: recorded in the written adapters' configs.
    """

    def __init__(self, pool, client, composed_dir, max_composed: int = 64, max_rank: int = 32,
                 base_model_name: str | None = None):
        self.pool = pool
        self.client = client
        self.dir = Path(composed_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_composed = max_composed
        self.max_rank = max_rank
        self.base_model_name = base_model_name
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._registered: collections.OrderedDict[str, tuple] = collections.OrderedDict()  # vLLM name -> key, LRU order
        self._direct: dict[str, str] = {}  # adapter name -> path registered under it
        self._users: collections.Counter[str] = collections.Counter()
        self._plain_cache: dict[str, bool] = {}
        self._ready: dict[str, threading.Event] = {}  # a name being written and registered: later requests wait for it
        self.stats = {"composed": 0, "registrations": 0, "unloaded": 0, "hits": 0}

    @staticmethod
    def is_selection(names, weights) -> bool:
        return len(names) == 1 and abs(float(weights[0]) - 1.0) < 1e-9

    def key_of(self, names: list[str], weights: list[float], mode: str) -> tuple:
        mode = mode if len(set(names)) > 1 else "mixture"  # one adapter: fusion and mixture are the same LoRA
        parts = sorted((n, round(float(w), 4), str(self.pool.entries[n].path) if n in self.pool.entries else "")
                       for n, w in zip(names, weights))
        return (mode, tuple(parts))

    @staticmethod
    def name_of(key: tuple) -> str:
        return "lr-" + key[0][:3] + "-" + hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]

    def acquire(self, names: list[str], weights: list[float], mode: str) -> str:
        """The vLLM model name serving this composition, written and registered when new; :meth:`release` it after
        the request. Raises :class:`RankTooLarge`, :class:`EngineUnavailable` or :class:`InputError`."""
        if self.is_selection(names, weights) and self._plain(names[0]):
            return self._acquire_direct(names[0])
        key = self.key_of(names, weights, mode)
        name = self.name_of(key)
        while True:
            with self._lock:
                if name in self._registered:
                    self._registered.move_to_end(name)
                    self._users[name] += 1
                    self.stats["hits"] += 1
                    return name
                event = self._ready.get(name)
                if event is None:
                    self._ready[name] = threading.Event()
                    break
            event.wait()
        try:
            rank = composition_rank(self.pool, names, key[0])
            if rank > self.max_rank:
                raise RankTooLarge(f"This request's {key[0]} of {len(names)} adapters has LoRA rank {rank}, over the vLLM server's "
                                   f"--max-lora-rank {self.max_rank} (--vllm_max_lora_rank); ask for fewer adapters (lora_num), or "
                                   f"restart vLLM with --max-lora-rank {vllm_rank(rank)} and this server with --vllm_max_lora_rank "
                                   f"{vllm_rank(rank)}.")
            from utils.composition import materialize

            path = self.dir / name
            if not (path / "adapter_config.json").exists():
                with self._write_lock:  # one at a time: each pins its adapters in the pool while it composes
                    materialize(self.pool, list(names), list(weights), key[0], path, self.base_model_name)
                self.stats["composed"] += 1
            self.client.load_lora(name, str(path))
            self.stats["registrations"] += 1
            with self._lock:
                self._registered[name] = key
                self._users[name] += 1
            self._evict()
            return name
        finally:
            with self._lock:
                self._ready.pop(name).set()

    def _plain(self, adapter: str) -> bool:
        """Whether vLLM can load the adapter's own folder as it is: one rank and one alpha for every module, no rsLoRA.
        Others (``rank_pattern``, ``alpha_pattern``, rsLoRA) are written out like a composition of one, their scalings
        folded into B, which is exact whatever vLLM makes of those fields."""
        entry = self.pool.entries.get(adapter)
        if entry is None:
            return True  # refused by _acquire_direct
        path = str(entry.path)
        if path not in self._plain_cache:
            from peft import PeftConfig

            try:
                cfg = PeftConfig.from_pretrained(path)
                self._plain_cache[path] = not (getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None)
                                               or getattr(cfg, "use_rslora", False))
            except (OSError, ValueError):
                self._plain_cache[path] = False  # the pool's reader names the problem when it composes it
        return self._plain_cache[path]

    def _acquire_direct(self, adapter: str) -> str:
        entry = self.pool.entries.get(adapter)
        if entry is None:
            raise InputError(f"Adapter {adapter!r} is not in the pool.")
        path = str(entry.path)
        while True:
            with self._lock:
                if self._direct.get(adapter) == path:
                    self._users[adapter] += 1
                    return adapter
                event = self._ready.get(adapter)
                if event is None:
                    self._ready[adapter] = threading.Event()
                    stale = adapter in self._direct  # another adapter was registered under this name before
                    break
            event.wait()
        try:
            rank = self.pool.weights(adapter).rank
            if rank > self.max_rank:
                raise RankTooLarge(f"Adapter {adapter!r} has rank {rank}, over the vLLM server's --max-lora-rank {self.max_rank} "
                                   f"(--vllm_max_lora_rank); restart vLLM with --max-lora-rank {vllm_rank(rank)}.")
            if stale:
                self.client.unload_lora(adapter)
            self.client.load_lora(adapter, path)
            with self._lock:
                self._direct[adapter] = path
                self._users[adapter] += 1
            return adapter
        finally:
            with self._lock:
                self._ready.pop(adapter).set()

    def release(self, name: str) -> None:
        with self._lock:
            self._users[name] -= 1
            if self._users[name] <= 0:
                del self._users[name]
        self._evict()

    def _evict(self) -> None:
        while True:
            with self._lock:
                if len(self._registered) <= self.max_composed:
                    return
                victim = next((n for n in self._registered if self._users[n] == 0), None)
                if victim is None:
                    return
                del self._registered[victim]
            self.client.unload_lora(victim)
            shutil.rmtree(self.dir / victim, ignore_errors=True)
            self.stats["unloaded"] += 1

    def describe(self) -> dict:
        with self._lock:
            return {"registered": len(self._registered), "direct": len(self._direct), "in_use": sum(1 for v in self._users.values() if v > 0),
                    **self.stats}
