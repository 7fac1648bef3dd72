"""Stage: the adapter pool. Adapters are read with stock ``peft``'s own readers, on first use, into three tiers.

An adapter is a standard PEFT LoRA directory (or hub id). Nothing is injected into the base model: the pool reads
the adapter's config with ``PeftConfig.from_pretrained`` and its weights with ``peft.utils.load_peft_weights``
(:mod:`utils.adapter_files`), and keeps, for every base-model module the adapter targets (keyed by the base model's
own module names):

    A_j[m]: [r_jm, d_in]     lora_A weight
    B_j[m]: [d_out, r_jm]    lora_B weight multiplied by the adapter's own scaling at m,
                             s_jm = alpha_jm / r_jm (alpha_jm / sqrt(r_jm) with rsLoRA), where r_jm and alpha_jm
                             follow ``rank_pattern`` / ``alpha_pattern`` with peft's own key matching

in the base weight's dtype (its adapters' dtype when the base weight is quantised). A batch of b rows with k adapters
each asks for its rows' factors (:meth:`AdapterPool.gather`), selected per row as punica / vLLM do:

    A_sel[m]: [b, k, R_m, d_in]    B_sel[m]: [b, k, d_out, R_m]    (R_m the largest rank at m among the batch's
                                   adapters; zero rows, empty slots and an adapter that does not target m add nothing)

Memory tiers, as vLLM's ``--max-loras`` / ``--max-cpu-loras``:

- device: at most ``max_loras`` adapters with their weights on the compute device(s); a running row pins its
  adapters here (:meth:`acquire` / :meth:`release`) and a pinned adapter is never evicted;
- host: at most ``max_cpu_loras`` adapters in host memory (the device tier is a subset; on a CPU model the two are
  the same tensors);
- disk: every other adapter, read again when retrieval next picks it.

Eviction is least-recently-used among unpinned adapters. :meth:`prefetch` reads adapters into the host tier on a
background thread, so that a request's adapters are read while the current decoding step runs.

Start-up reads only the pool config (and the cards, in the retriever); ``eager=True`` reads every adapter once at
start-up to check it, keeping what the host tier holds.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from utils.adapter_files import LoraWeights, module_shape, read_adapter, targetable_modules
from utils.cpu_threads import release_openmp_pool
from utils.data import InputError, PoolEntry

logger = logging.getLogger(__name__)

DEFAULT_MAX_LORAS = 64
class PoolFull(RuntimeError):
    """More distinct adapters are in use than ``max_loras`` allows; the caller forms a smaller batch."""


@dataclass
class PoolStats:
    loads: int = 0  # adapters read from disk
    load_seconds: float = 0.0
    evictions_device: int = 0
    evictions_host: int = 0
    failures: int = 0


def _slot(factors, rank: int, zeros):
    """One slot of :meth:`AdapterPool.gather`: an adapter's (A [r, d_in], B [d_out, r]) zero-padded to ``rank``, or
    ``zeros`` where the adapter does not target the module (or the slot is past the row's adapters)."""
    if factors is None:
        return zeros
    a, b = factors
    if a.shape[0] < rank:
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
        b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
    return a, b


class AdapterPool:
    """The pool's adapters by name, read on first use and kept in the device / host tiers (module docstring).

    ``names`` lists the adapters in pool order; ``index[name]`` is an adapter's id, which stays the same while it is
    in the pool (ids are never reused, so a row that still holds the id of an unloaded adapter cannot meet another).

    Args:
        base_model: the base causal LM (left as it is: composition adds hooks only inside its context managers).
        entries: the pool config's entries.
        max_loras: adapters resident on the compute device at most (None: the default, 64).
        max_cpu_loras: adapters in host memory at most (None: ``max_loras``, as vLLM's default).
        eager: read every adapter at start-up (checks the whole pool; keeps what the host tier holds).
    """

    def __init__(self, base_model, entries: list[PoolEntry], show_progress: bool = True, max_loras: int | None = None,
                 max_cpu_loras: int | None = None, eager: bool = False):
        if not entries:
            raise InputError("The adapter pool is empty; the pool config must list at least one LoRA.")
        self.max_loras = DEFAULT_MAX_LORAS if max_loras is None else int(max_loras)
        self.max_cpu_loras = self.max_loras if max_cpu_loras is None else int(max_cpu_loras)
        if self.max_loras < 1:
            raise InputError(f"--max_loras must be at least 1 (got {self.max_loras}).")
        if self.max_cpu_loras < self.max_loras:
            raise InputError(f"--max_cpu_loras {self.max_cpu_loras} is below --max_loras {self.max_loras}; the host tier holds "
                             "the device tier, so raise --max_cpu_loras or lower --max_loras.")
        self.model = base_model
        self.targets = targetable_modules(base_model)
        # A skeleton model on the meta device (its generation runs elsewhere, e.g. vLLM): factors stay on the host.
        self._devices = {n: (torch.device("cpu") if m.weight.device.type == "meta" else m.weight.device) for n, m in self.targets.items()}
        self._on_cpu = all(d.type == "cpu" for d in self._devices.values())
        self._lock = threading.RLock()
        self.entries: dict[str, PoolEntry] = {}
        self.index: dict[str, int] = {}
        self._next_id = 0
        self._name_of: dict[int, str] = {}
        self._host: collections.OrderedDict[str, LoraWeights] = collections.OrderedDict()
        self._device: collections.OrderedDict[str, LoraWeights] = collections.OrderedDict()
        self._pins: collections.Counter[str] = collections.Counter()
        self._reading: dict[str, Future] = {}
        self._removed: dict[str, PoolEntry] = {}  # unloaded, but still pinned or held by a request
        self._holds: collections.Counter[str] = collections.Counter()
        self._executor: ThreadPoolExecutor | None = None
        self.stats = PoolStats()
        for entry in entries:
            self.add(entry)
        if eager:
            for name in tqdm(list(self.entries), desc="Reading adapters", disable=not show_progress):
                self._host_weights(name)
        logger.info("Pool of %d adapters (device tier %d, host tier %d%s)", len(self.entries), self.max_loras, self.max_cpu_loras,
                    ", all read once" if eager else ", read on first use")

    # -- membership ----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def add(self, entry: PoolEntry, weights: LoraWeights | None = None) -> int:
        """Register ``entry`` (its weights are read on first use unless given, already read); returns its id."""
        with self._lock:
            if entry.name in self.entries:
                raise InputError(f"Adapter name {entry.name!r} is already in the pool; choose another name or unload it first.")
            if entry.name in self._removed:
                raise InputError(f"Adapter name {entry.name!r} was unloaded and requests routed to it are still running; "
                                 "retry when they finish, or choose another name.")
            self.entries[entry.name] = entry
            self.index[entry.name] = self._next_id
            self._name_of[self._next_id] = entry.name
            self._next_id += 1
            if weights is not None:
                self._put_host(entry.name, weights)
            return self.index[entry.name]

    def remove(self, name: str) -> PoolEntry:
        """Unregister ``name``; rows running with it keep it (its weights go when the last one releases it)."""
        with self._lock:
            if name not in self.entries:
                raise KeyError(name)
            entry = self.entries.pop(name)
            self.index.pop(name)
            if self._pins[name] > 0 or self._holds[name] > 0:
                self._removed[name] = entry
            else:
                self._drop(name)
            return entry

    def hold(self, names) -> None:
        """Keep ``names`` readable for a request that was routed to them, even if they are unloaded before it runs."""
        with self._lock:
            for n in dict.fromkeys(names):
                self._holds[n] += 1

    def unhold(self, names) -> None:
        with self._lock:
            self._count_down(self._holds, names)

    def _count_down(self, counts, names) -> None:
        """With the lock held: one hold or pin fewer on each of ``names``; an unloaded adapter no row uses is dropped."""
        for n in dict.fromkeys(names):
            if counts[n] > 0:
                counts[n] -= 1
            if counts[n] == 0:
                counts.pop(n, None)
                self._forget_if_unused(n)

    def _forget_if_unused(self, name: str) -> None:
        if name in self._removed and self._pins[name] == 0 and self._holds[name] == 0:
            self._drop(name)

    def name_of(self, adapter_id: int) -> str:
        return self._name_of[adapter_id]

    def indices(self, names: list[list[str]]) -> torch.Tensor:
        """Adapter ids [b, k] of per-sample adapter names."""
        try:
            return torch.tensor([[self.index[n] for n in row] for row in names], dtype=torch.long)
        except KeyError as err:
            raise InputError(f"Adapter {err.args[0]!r} is not in the pool; known adapters: {', '.join(self.names)}.") from err

    def read(self, name: str, path: str) -> LoraWeights:
        """Read and check an adapter that is not (yet) in the pool (a runtime load); does not register it."""
        return read_adapter(name, path, self.targets)

    # -- tiers ---------------------------------------------------------------------------------------------
    def _drop(self, name: str) -> None:
        self._host.pop(name, None)
        self._device.pop(name, None)
        self._pins.pop(name, None)
        self._removed.pop(name, None)

    def _put_host(self, name: str, weights: LoraWeights) -> None:
        self._host[name] = weights
        self._host.move_to_end(name)
        while len(self._host) > self.max_cpu_loras:
            victim = next((n for n in self._host if self._pins[n] == 0 and n != name), None)
            if victim is None:
                break
            self._host.pop(victim)
            self._device.pop(victim, None)
            self.stats.evictions_host += 1

    def _read_from_disk(self, name: str, path: str) -> LoraWeights:
        t0 = time.perf_counter()
        try:
            weights = read_adapter(name, path, self.targets)
        except InputError:
            with self._lock:
                self.stats.failures += 1
            raise
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - t0
        return weights

    def _host_weights(self, name: str) -> LoraWeights:
        """``name``'s host-tier weights, read from disk (or taken from a prefetch in flight) when absent."""
        with self._lock:
            w = self._host.get(name)
            if w is not None:
                self._host.move_to_end(name)
                return w
            if name not in self.entries and name not in self._removed:
                raise InputError(f"Adapter {name!r} is not in the pool; known adapters: {', '.join(self.names)}.")
            pending = self._reading.get(name)
            path = (self.entries.get(name) or self._removed[name]).path
        w = pending.result() if pending is not None else self._read_from_disk(name, path)
        with self._lock:
            if name in self.entries or name in self._removed:
                self._put_host(name, w)
        return w

    def prefetch(self, names) -> None:
        """Read ``names`` into the host tier on a background thread (those not there or in flight already)."""
        with self._lock:
            todo = [n for n in dict.fromkeys(names) if n in self.entries and n not in self._host and n not in self._reading]
            if not todo:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-prefetch")
            for n in todo:
                fut = self._executor.submit(self._prefetch_one, n, self.entries[n].path)
                self._reading[n] = fut
                fut.add_done_callback(lambda f, n=n: self._prefetched(n, f))

    def _prefetch_one(self, name: str, path: str) -> LoraWeights:
        """On the prefetch thread: read one adapter, then release that thread's OpenMP workers, if reading started any
        (the decoding thread keeps the only pool, utils/cpu_threads.py)."""
        try:
            return self._read_from_disk(name, path)
        finally:
            release_openmp_pool()

    def _prefetched(self, name: str, fut: Future) -> None:
        with self._lock:
            self._reading.pop(name, None)
            if fut.exception() is None and name in self.entries and name not in self._host:
                self._put_host(name, fut.result())

    def weights(self, name: str) -> LoraWeights:
        """``name``'s factors in the host tier (read from disk when absent)."""
        return self._host_weights(name)

    def load(self, names) -> None:
        """Read ``names`` into the host tier now (a request's adapters before it joins the batch); raises
        :class:`InputError` naming an adapter that cannot be read."""
        for n in dict.fromkeys(names):
            self._host_weights(n)

    def pinned(self) -> set[str]:
        with self._lock:
            return {n for n, c in self._pins.items() if c > 0}

    def acquire(self, names) -> None:
        """Pin ``names`` on the device tier (reading them as needed); raises :class:`PoolFull` when they do not fit.

        Pins are counted: each :meth:`acquire` is matched by one :meth:`release` of the same names.
        """
        names = list(dict.fromkeys(names))
        if not names:
            return
        with self._lock:
            in_use = self.pinned()
            new = [n for n in names if n not in in_use]
            if len(in_use) + len(new) > self.max_loras:
                raise PoolFull(f"{len(in_use) + len(new)} distinct adapters would be in use, over --max_loras {self.max_loras}.")
        loaded = {n: self._host_weights(n) for n in names}  # outside the lock: disk reads
        with self._lock:
            for n in names:
                if n not in self.entries and n not in self._removed:
                    raise InputError(f"Adapter {n!r} was unloaded from the pool.")
            for n in names:
                self._pins[n] += 1
                if n not in self._device:
                    self._device[n] = loaded[n] if self._on_cpu else loaded[n].to_devices(self._devices)
                self._device.move_to_end(n)
                if n not in self._host:
                    self._put_host(n, loaded[n])
            while len(self._device) > self.max_loras:
                victim = next((n for n in self._device if self._pins[n] == 0), None)
                if victim is None:
                    break
                self._device.pop(victim)
                self.stats.evictions_device += 1

    def release(self, names) -> None:
        with self._lock:
            self._count_down(self._pins, names)

    def pinned_weights(self, names) -> list[LoraWeights]:
        """The device tier's factors of ``names`` (pinned: :meth:`acquire`), in order; the same object for an adapter
        for as long as it stays on the device tier."""
        with self._lock:
            out = []
            for n in names:
                w = self._device.get(n)
                if w is None or self._pins[n] == 0:
                    raise RuntimeError(f"Adapter {n!r} is not pinned on the device tier; acquire it before composing.")
                out.append(w)
            return out

    def gather(self, rows: list[list[str]], k: int) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]]:
        """Per module any adapter of ``rows`` targets: (name, module, A_sel [b, k, R, d_in], B_sel [b, k, d_out, R]).

        Slot j of row b holds the factors of adapter ``rows[b][j]``, zero-padded to the largest rank R at the module
        among the batch's adapters; a slot past the row's adapters, or of an adapter that does not target the module,
        holds zeros. The adapters must be pinned (:meth:`acquire`). Modules come in the base model's order.
        """
        out = []
        for m, module, slots, rank in self.slots(rows, k):
            d_in, d_out = module_shape(module)
            A_sel = torch.stack([a for a, _ in slots]).reshape(len(rows), k, rank, d_in)
            B_sel = torch.stack([b for _, b in slots]).reshape(len(rows), k, d_out, rank)
            out.append((m, module, A_sel, B_sel))
        return out

    def slots(self, rows: list[list[str]], k: int) -> list[tuple[str, torch.nn.Module, list, int]]:
        """:meth:`gather`'s slots before they are stacked: per module, (name, module, [(A [R, d_in], B [d_out, R])]
        for row 0's k slots, then row 1's, ..., R), so that a caller can stack several modules' slots at once."""
        names = list({n for row in rows for n in row})
        weights = dict(zip(names, self.pinned_weights(names)))
        modules = {m for w in weights.values() for m in w.modules}
        out = []
        for m in (m for m in self.targets if m in modules):
            present = [w.modules[m] for w in weights.values() if m in w.modules]
            a0 = present[0][0]
            rank = max(a.shape[0] for a, _ in present)
            d_in, d_out = module_shape(self.targets[m])
            zeros = (torch.zeros(rank, d_in, device=a0.device, dtype=a0.dtype), torch.zeros(d_out, rank, device=a0.device, dtype=a0.dtype))
            out.append((m, self.targets[m], [_slot(weights[row[j]].modules.get(m) if j < len(row) else None, rank, zeros)
                                             for row in rows for j in range(k)], rank))
        return out

    def tier_counts(self) -> dict[str, int]:
        """Adapters per tier: ``device``, ``host`` (which includes the device tier), ``disk`` (registered, not in memory)."""
        with self._lock:
            return {"device": len(self._device), "host": len(self._host), "disk": len(set(self.entries) - set(self._host)),
                    "pinned": len(self.pinned())}

    def describe(self) -> dict:
        """Tier counts, limits and load figures (what ``/health`` and ``/metrics`` report)."""
        with self._lock:
            s = self.stats
            return {"adapters": len(self.entries), **self.tier_counts(), "max_loras": self.max_loras,
                    "max_cpu_loras": self.max_cpu_loras, "loads": s.loads, "load_seconds": round(s.load_seconds, 4),
                    "evictions_device": s.evictions_device, "evictions_host": s.evictions_host, "load_failures": s.failures}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
