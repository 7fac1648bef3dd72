"""Stage: changing the served pool at run time. Loading and unloading adapters, and the pool state that survives restarts.

``POST /v1/load_lora_adapter`` takes vLLM's fields ``{"lora_name", "lora_path"}`` and, optionally, ``domain`` and
``samples`` (the adapter's card: strings or ``{"inputs": ...}``). With samples the adapter joins retrieval at once;
without them it is used only when a request names it (``model`` or ``adapters``). ``POST /v1/unload_lora_adapter``
takes ``{"lora_name"}``: requests already routed to the adapter finish with it, new ones no longer see it.

Rules, checked before the pool changes (a refused load leaves the pool exactly as it was):

- a path must lie inside one of the ``--adapter_root`` folders once resolved (``..`` and symlinks followed): 403;
- the adapter must be a plain LoRA that fits the base model, readable, under a free name: 400;
- with an API key set, both routes need it; without one, they answer only when the server binds a loopback address.

The change itself runs on the scheduler thread between two decoding steps (:meth:`Scheduler.call`). With
``--pool_state FILE``, every change is recorded there (written to a temporary file, flushed, then renamed over the
old one), and a restart with the same file comes back with the same pool.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
from pathlib import Path

from utils.data import InputError, PoolEntry, looks_like_hub_id

logger = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
RESERVED = ("auto", "base")
MAX_SAMPLES = 1000
STATE_VERSION = 1


class AdminError(Exception):
    """A refused pool change: HTTP ``status`` and a message naming the field and the fix."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_roots(entries: list[PoolEntry]) -> list[Path]:
    """The folders holding the pool config's local adapters (the default ``--adapter_root``)."""
    roots = []
    for e in entries:
        if not looks_like_hub_id(e.path):
            parent = Path(e.path).resolve().parent
            if parent not in roots:
                roots.append(parent)
    return roots


def card_texts(samples) -> list[str]:
    """A card as texts: a list of strings or of ``{"inputs": ...}`` objects."""
    if not isinstance(samples, list) or not samples:
        raise AdminError(400, "'samples' must be a non-empty list of strings or {\"inputs\": ...} objects (the adapter's card).", "samples")
    if len(samples) > MAX_SAMPLES:
        raise AdminError(400, f"'samples' has {len(samples)} entries; send at most {MAX_SAMPLES}.", "samples")
    texts = []
    for i, s in enumerate(samples):
        text = s.get("inputs") if isinstance(s, dict) else s
        if not isinstance(text, str) or not text.strip():
            raise AdminError(400, f"'samples'[{i}] must be a non-empty string or an object with a non-empty string 'inputs'.", "samples")
        texts.append(text)
    return texts


class PoolAdmin:
    """Runtime loads and unloads over one :class:`utils.serving.serving_engine.Engine` (module docstring).

    Args:
        engine: the served engine (its pool, router, scheduler and entries change).
        roots: folders a runtime load may read from.  state_path: the ``--pool_state`` file, or None.
    """

    def __init__(self, engine, roots: list[Path], state_path: str | Path | None = None):
        self.engine = engine
        self.roots = [Path(r).resolve() for r in roots]
        self.state_path = Path(state_path) if state_path else None
        self.config_names = [e.name for e in engine.entries]
        self.loaded: dict[str, dict] = {}  # runtime loads still in the pool: name -> {lora_name, lora_path, domain, samples}
        self.unloaded: list[str] = []  # pool-config adapters unloaded at run time
        self._lock = threading.Lock()  # one change at a time: the pool, the records and the state file agree

    # -- checks --------------------------------------------------------------------------------------------
    def check_path(self, path) -> Path:
        if not isinstance(path, str) or not path.strip():
            raise AdminError(400, "'lora_path' must be a non-empty string: the adapter's folder on this machine.", "lora_path")
        real = Path(path).expanduser().resolve()
        if not any(real == root or root in real.parents for root in self.roots):
            roots = ", ".join(str(r) for r in self.roots) or "none"
            raise AdminError(403, f"'lora_path' {path} resolves to {real}, outside the adapter roots ({roots}); put the adapter "
                                  "under one of them or start the server with --adapter_root FOLDER.", "lora_path", "path_not_allowed")
        if not real.is_dir():
            raise AdminError(400, f"'lora_path' {path} is not a folder; give the adapter's folder (with adapter_config.json).", "lora_path")
        return real

    def check_name(self, name) -> str:
        if not isinstance(name, str) or not NAME.match(name) or name in RESERVED:
            raise AdminError(400, "'lora_name' must be 1-128 letters, digits, '.', '_', ':' or '-' (starting with a letter or digit), "
                                  f"and not {' or '.join(RESERVED)}.", "lora_name")
        return name

    # -- changes -------------------------------------------------------------------------------------------
    def load(self, body: dict) -> dict:
        """Check, read and add one adapter (runs on a worker thread; the change itself on the scheduler's)."""
        with self._lock:
            return self._load(body)

    def unload(self, body: dict) -> dict:
        with self._lock:
            return self._unload(body)

    def _load(self, body: dict) -> dict:
        pool = self.engine.pool
        if pool is None:
            raise AdminError(400, "This server was started with --no_adapters; restart it with a pool to load adapters.")
        unknown = sorted(set(body) - {"lora_name", "lora_path", "domain", "samples", "load_inplace"})
        if unknown:
            raise AdminError(400, f"Unknown fields {unknown}; send lora_name, lora_path and optionally domain and samples.", unknown[0])
        if body.get("load_inplace"):
            raise AdminError(400, "'load_inplace' (replacing an adapter under its name) is not supported; unload it first.", "load_inplace")
        name = self.check_name(body.get("lora_name"))
        real = self.check_path(body.get("lora_path"))
        domain = body.get("domain") or ""
        if not isinstance(domain, str):
            raise AdminError(400, "'domain' must be a string.", "domain")
        samples = card_texts(body["samples"]) if body.get("samples") is not None else None
        if name in pool:
            raise AdminError(400, f"The adapter {name!r} is already in the pool; unload it first or choose another name.", "lora_name",
                             "name_taken")
        try:
            weights = pool.read(name, str(real))
        except InputError as err:
            raise AdminError(400, str(err), "lora_path", "invalid_adapter") from err
        entry = PoolEntry(name=name, domain=domain, samples=samples or [], path=str(real))
        self._on_scheduler(lambda: self._add(entry, samples, weights))
        self.loaded[name] = {"lora_name": name, "lora_path": str(real), "domain": domain, "samples": samples}
        self.save()
        scoring = getattr(self.engine, "scoring", None)
        if scoring is not None:  # routed through the task library once scored on it, in the background
            scoring.submit(name, str(real))
        logger.info("Loaded adapter %s from %s (%s)", name, real, "retrievable" if samples else
                    "by name; routed through tasks once scored" if scoring is not None else "by name only")
        return {"object": "lora_adapter", "lora_name": name, "lora_path": str(real), "domain": domain, "retrievable": bool(samples),
                "task_scoring": "queued" if scoring is not None else None,
                "rank": weights.rank, "bytes": weights.nbytes, "message": f"Success: LoRA adapter '{name}' added successfully."}

    def _unload(self, body: dict) -> dict:
        pool = self.engine.pool
        name = body.get("lora_name")
        if pool is None or not isinstance(name, str) or name not in pool:
            raise AdminError(404, f"The adapter {name!r} is not in the pool; GET /v1/models lists the adapters.", "lora_name", "model_not_found")
        self._on_scheduler(lambda: self._remove(name))
        if self.loaded.pop(name, None) is None and name in self.config_names and name not in self.unloaded:
            self.unloaded.append(name)
        self.save()
        logger.info("Unloaded adapter %s", name)
        return {"object": "lora_adapter", "lora_name": name, "message": f"Success: LoRA adapter '{name}' removed successfully."}

    def _on_scheduler(self, fn):
        try:
            return self.engine.scheduler.call(fn).result(timeout=600)
        except InputError as err:
            raise AdminError(400, str(err)) from err
        except ValueError as err:
            raise AdminError(400, str(err)) from err

    def _add(self, entry: PoolEntry, samples, weights) -> None:
        eng = self.engine
        if entry.name in eng.pool:
            raise AdminError(400, f"The adapter {entry.name!r} is already in the pool; unload it first or choose another name.",
                             "lora_name", "name_taken")
        if samples and eng.router.retriever is None:
            raise AdminError(400, "This server has no retriever, so an adapter cannot join retrieval; load it without samples.", "samples")
        eng.loras.add(entry, samples, weights)  # every view of the pool, or none

    def _remove(self, name: str) -> None:
        self.engine.loras.remove(name)

    # -- the state file ------------------------------------------------------------------------------------
    def save(self) -> None:
        if self.state_path is None:
            return
        state = {"version": STATE_VERSION, "base_model": self.engine.model_name, "unloaded": self.unloaded,
                 "loaded": list(self.loaded.values())}
        path = self.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # the rename itself reaches the disk
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def restore(self) -> None:
        """Apply ``--pool_state`` at start-up (before serving): unload and load what it records, reading no weights."""
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"--pool_state {self.state_path} cannot be read ({err}); fix or delete it.") from err
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InputError(f"--pool_state {self.state_path} is not a pool state of version {STATE_VERSION}; delete it to start afresh.")
        if state.get("base_model") not in (None, self.engine.model_name):
            raise InputError(f"--pool_state {self.state_path} was written for base model {state.get('base_model')!r}, not "
                             f"{self.engine.model_name!r}; use another state file for this model.")
        eng = self.engine
        for name in state.get("unloaded", []):
            if name in eng.pool:
                self._remove(name)
                self.unloaded.append(name)
        for item in state.get("loaded", []):
            name = item.get("lora_name")
            where = f"--pool_state {self.state_path}: adapter {name!r}"
            try:
                real = self.check_path(item.get("lora_path"))
                if not (real / "adapter_config.json").is_file():
                    raise AdminError(400, f"{real} has no adapter_config.json")
            except AdminError as err:
                raise InputError(f"{where}: {err.message}; restore the adapter or remove it from the state file.") from err
            if name in eng.pool:
                raise InputError(f"{where} is also in the pool config; remove one of them.")
            samples = item.get("samples") or None
            self._add(PoolEntry(name=name, domain=item.get("domain") or "", samples=samples or [], path=str(real)), samples, None)
            self.loaded[name] = {"lora_name": name, "lora_path": str(real), "domain": item.get("domain") or "", "samples": samples}
        logger.info("Pool state %s: %d adapters loaded, %d unloaded at run time", self.state_path, len(self.loaded), len(self.unloaded))
