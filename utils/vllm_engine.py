"""Stage: generation on a vLLM server. The project retrieves and composes; vLLM generates.

vLLM serves one LoRA per request, chosen by the client. Every composition the router answers is exactly one LoRA
(:func:`utils.composition.materialize`):

    mixture of k adapters, weights w:   A = concat_j A_j (rank sum_j r_j),  B = concat_j w_j s_j B_j,  scaling 1
    fusion:                             A = sum_j w_j A_j (rank max_j r_j), B = sum_j w_j s_j B_j,     scaling 1
    selection (one adapter, weight 1):  the adapter's own directory (written out as above when it uses rank_pattern,
                                        alpha_pattern or rsLoRA)

so each distinct composition is written once as a standard PEFT directory under ``--composed_dir``, registered
with vLLM at run time (``POST /v1/load_lora_adapter``, which needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` on the
vLLM side), and the request is sent with ``model`` set to it. vLLM then batches requests of different compositions
together, up to its ``--max-loras``. Compositions are keyed by (mode, sorted names with weights rounded to 1e-4,
their adapters' paths); past ``--max_composed`` registered ones, the least recently used one that no request is
using is unloaded from vLLM and its directory deleted.

A composition's rank must not exceed vLLM's ``--max-lora-rank`` (given here as ``--vllm_max_lora_rank``): a mixture of
3 adapters of rank 8 has rank 24, so vLLM must be started with ``--max-lora-rank 32`` (vLLM takes 1, 8, 16, 32, 64,
128, 256, 320, 512). A request over it is refused with a 400 naming both numbers.

:class:`VllmClient` talks to a server (a vLLM that is down, stalls or answers 5xx raises :class:`EngineUnavailable`,
which the server turns into a 503); :class:`ComposedAdapters` keeps the compositions registered on it;
:class:`Replicas` sends each composition to the same one of several vLLM servers (adapter affinity);
:func:`generate_rows` is the evaluation's generation through them (``main.py --engine vllm``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from utils.data import InputError

logger = logging.getLogger(__name__)

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise InputError(f"A LoRA of rank {rank} is over vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}); compose fewer adapters.")


def engine_settings(args) -> dict:
    """What a run or server on vLLM records of its engine; ``composed_dir`` defaults to <cache>/composed/<base model>."""
    import re

    from utils.model_loading import cache_dir

    composed = args.composed_dir or str(cache_dir() / "composed" / re.sub(r"[^A-Za-z0-9._-]+", "_", str(args.base_model)))
    return {"engine": "vllm", "vllm_url": list(args.vllm_url), "vllm_max_lora_rank": args.vllm_max_lora_rank, "composed_dir": composed}


class EngineUnavailable(Exception):
    """The vLLM server cannot answer: down, stalled, or a 5xx. ``message`` says which and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class EngineRefused(Exception):
    """vLLM refused a request (4xx): ``status`` and its message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RankTooLarge(Exception):
    """A composition's rank is over vLLM's ``--max-lora-rank``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _error_text(response) -> str:
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    except ValueError:
        return response.text[:500]


class VllmClient:
    """The OpenAI API of one vLLM server (``url``: ``http://host:port``, without ``/v1``).

    ``timeout``: seconds a read may wait (a stalled vLLM ends the request with :class:`EngineUnavailable`); connecting
    waits at most 5 s.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, connections: int = 64):
        import httpx

        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0),
                                 limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, body: dict | None = None):
        import httpx

        try:
            response = self.http.request(method, path, json=body)
        except httpx.TimeoutException as err:
            raise EngineUnavailable(f"The vLLM server at {self.url} did not answer {path} in time ({type(err).__name__}); check that it "
                                    "is running and not overloaded.") from err
        except httpx.HTTPError as err:
            raise EngineUnavailable(f"The vLLM server at {self.url} is not reachable ({type(err).__name__}: {err}); start it "
                                    "(bench/start_vllm.sh) or fix --vllm_url.") from err
        if response.status_code >= 500:
            raise EngineUnavailable(f"The vLLM server at {self.url} answered {path} with {response.status_code}: {_error_text(response)}")
        if response.status_code >= 400:
            raise EngineRefused(response.status_code, _error_text(response))
        return response

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models").json().get("data", [])

    def base_model(self) -> str:
        """The name vLLM serves its base model under (the first model that is not a LoRA)."""
        models = self.models()
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise EngineUnavailable(f"The vLLM server at {self.url} lists no base model in /v1/models.")
        return bases[0]

    def load_lora(self, name: str, path: str) -> None:
        try:
            self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        except EngineRefused as err:
            if "already" in err.message.lower():  # registered before (at vLLM's start, or by an earlier run of this router)
                root = next((m.get("root") for m in self.models() if m["id"] == name), None)
                if root is not None and Path(root).resolve() == Path(path).resolve():
                    return
                self.unload_lora(name)  # the name serves another folder: replace it
                self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
                return
            if err.status == 404 or "runtime" in err.message.lower():
                raise EngineUnavailable(f"The vLLM server at {self.url} refused to load a LoRA at run time ({err.message}); start it "
                                        "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora (bench/start_vllm.sh does).") from err
            raise

    def unload_lora(self, name: str) -> None:
        try:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except EngineRefused:  # not registered (any more): nothing to undo
            pass

    def stream(self, path: str, body: dict, cancelled=lambda: False):
        """The JSON chunks of a streamed completion; stops (closing the connection, which aborts the request in vLLM)
        as soon as ``cancelled()`` is true."""
        import httpx

        try:
            with self.http.stream("POST", path, json=dict(body, stream=True)) as response:
                if response.status_code >= 400:
                    response.read()
                    if response.status_code >= 500:
                        raise EngineUnavailable(f"The vLLM server at {self.url} answered {response.status_code}: {_error_text(response)}")
                    raise EngineRefused(response.status_code, _error_text(response))
                for line in response.iter_lines():
                    if cancelled():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise EngineUnavailable(f"The vLLM server at {self.url} failed during generation: "
                                                f"{err.get('message', err) if isinstance(err, dict) else err}")
                    yield chunk
        except httpx.TimeoutException as err:
            raise EngineUnavailable(f"The vLLM server at {self.url} stalled (no output within the --vllm_timeout); check that it is "
                                    "running and not overloaded.") from err
        except httpx.HTTPError as err:
            raise EngineUnavailable(f"The vLLM server at {self.url} is not reachable or dropped the connection ({type(err).__name__}: "
                                    f"{err}); start it (bench/start_vllm.sh) or fix --vllm_url.") from err


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
        client: the :class:`VllmClient`.
        composed_dir: where compositions are written (one folder each).
        max_composed: registered compositions kept at most (in-use ones are never unloaded).
        max_rank: vLLM's ``--max-lora-rank``.
        base_model_name: recorded in the written adapters' configs.
    """

    def __init__(self, pool, client: VllmClient, composed_dir, max_composed: int = 64, max_rank: int = 32,
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


class Replica:
    """One vLLM server: its client, its registered compositions, the requests in flight on it."""

    def __init__(self, client: VllmClient, adapters: ComposedAdapters | None):
        self.client, self.adapters = client, adapters
        self.in_flight = 0


class Replicas:
    """The vLLM servers behind one router (``--vllm_url`` once per server) and which one serves a request.

    A runtime-loaded LoRA lives on the server it was loaded on, so a composition is always sent to the same server:
    the one that wins rendezvous hashing of (server, composition) (adapter affinity; adding or removing a server moves
    only the compositions of that server). Base-model requests go to the server with the fewest requests in flight.
    Each server has its own registry (and folder) of compositions.
    """

    def __init__(self, urls: list[str], pool, composed_dir, max_composed: int = 256, max_rank: int = 32, base_model_name: str | None = None,
                 api_key: str | None = None, timeout: float = 300.0, connections: int = 64, base_name: str | None = None):
        self.replicas = []
        for i, url in enumerate(urls):
            client = VllmClient(url, api_key, timeout, connections=connections)
            folder = Path(composed_dir) if len(urls) == 1 else Path(composed_dir) / f"server{i}"
            adapters = ComposedAdapters(pool, client, folder, max_composed, max_rank, base_model_name) if pool is not None else None
            self.replicas.append(Replica(client, adapters))
        self._base_name = base_name
        self._lock = threading.Lock()

    @classmethod
    def from_args(cls, args, pool, connections: int = 64) -> "Replicas":
        """The servers of ``--vllm_url`` with the engine flags (``--composed_dir`` defaulted by :func:`engine_settings`)."""
        return cls(args.vllm_url, pool, engine_settings(args)["composed_dir"], args.max_composed, args.vllm_max_lora_rank,
                   args.base_model, args.vllm_api_key, args.vllm_timeout, connections=connections, base_name=args.vllm_model)

    @property
    def urls(self) -> list[str]:
        return [r.client.url for r in self.replicas]

    def base_name(self) -> str:
        """The name vLLM serves the base model under (asked once, from the first server that answers)."""
        if self._base_name is None:
            errors = []
            for r in self.replicas:
                try:
                    self._base_name = r.client.base_model()
                    break
                except EngineUnavailable as err:
                    errors.append(err.message)
            else:
                raise EngineUnavailable(" ".join(errors))
        return self._base_name

    def pick(self, names: list[str], weights: list[float], mode: str) -> Replica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        if not names:
            with self._lock:
                return min(self.replicas, key=lambda r: r.in_flight)
        ref = self.replicas[0].adapters
        key = names[0] if ref.is_selection(names, weights) else ref.name_of(ref.key_of(names, weights, mode))
        return max(self.replicas, key=lambda r: hashlib.sha1(f"{r.client.url}|{key}".encode()).digest())

    def acquire(self, names: list[str], weights: list[float], mode: str) -> tuple[Replica, str]:
        """(the server, the model name to send) for one request's composition; :meth:`release` after it."""
        replica = self.pick(names, weights, mode)
        model = replica.adapters.acquire(list(names), list(weights), mode) if names else self.base_name()
        with self._lock:
            replica.in_flight += 1
        return replica, model

    def release(self, replica: Replica, names: list[str], model: str) -> None:
        with self._lock:
            replica.in_flight -= 1
        if names:
            replica.adapters.release(model)

    def describe(self) -> dict:
        out = {"servers": self.urls, "in_flight_per_server": [r.in_flight for r in self.replicas]}
        if self.replicas[0].adapters is not None:
            per = [r.adapters.describe() for r in self.replicas]
            out["composed"] = {k: sum(d[k] for d in per) for k in per[0]}
        return out

    def close(self) -> None:
        for r in self.replicas:
            r.client.close()


def generate_rows(replicas: Replicas, prompt_ids: list[list[int]], compositions: list[tuple[list[str], list[float], str]],
                  max_new_tokens: int, tokenizer, concurrency: int = 32) -> tuple[list[str], list[int]]:
    """Greedy continuations of token-id prompts on vLLM, each row with its own composition (names, weights, mode;
    no names: the base model). Returns (texts, generated tokens per row up to the first EOS), decoded as
    :func:`utils.generation.generate_batch` does."""
    eos = tokenizer.eos_token_id

    def one(i: int):
        names, weights, mode = compositions[i]
        replica, model = replicas.acquire(list(names), list(weights), mode)
        try:
            body = {"model": model, "prompt": prompt_ids[i], "max_tokens": max_new_tokens, "temperature": 0.0,
                    "return_token_ids": True, "skip_special_tokens": False}
            ids: list[int] = []
            for chunk in replica.client.stream("/v1/completions", body):
                for choice in chunk.get("choices", []):
                    ids.extend(choice.get("token_ids") or [])
        finally:
            replicas.release(replica, names, model)
        return ids[:ids.index(eos) + 1] if eos in ids else ids

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(prompt_ids)))) as ex:
        generated = list(ex.map(one, range(len(prompt_ids))))
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated], [len(ids) for ids in generated]


def vllm_command(model_dir: str, port: int = 8100, max_lora_rank: int = 32, max_loras: int = 16, lora_modules: dict | None = None,
                 dtype: str = "float32", device: str = "cpu", python: str = ".venv-vllm/bin/python", max_model_len: int = 2048,
                 max_num_seqs: int = 32, served_name: str = "base", extra: list[str] | None = None) -> tuple[list[str], dict]:
    """(argv, environment) that start vLLM's OpenAI server the way ``--engine vllm`` needs it: LoRA on, runtime loads
    allowed, the base model served as ``served_name``; on CPU, vLLM's CPU build with a bounded KV cache and one OpenMP
    thread per core. ``lora_modules``: adapters registered at start-up ({name: path}), for clients that name them."""
    import os

    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_NO_USAGE_STATS": "1"}
    if Path(model_dir).is_dir() and all(Path(p).is_dir() for p in (lora_modules or {}).values()):
        env["HF_HUB_OFFLINE"] = "1"  # everything is local: vLLM never asks the Hub (hub ids keep their download)
    if device == "cpu":
        # vLLM's CPU docs ask for tcmalloc: with glibc's allocator its steps spend most of their time in the kernel
        # (measured here: 32 requests of 10 tokens over 5 LoRAs took 108 s without it, 42 s with it).
        tcmalloc = next((p for p in TCMALLOC if Path(p).exists()), None)
        if tcmalloc and "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(x for x in (tcmalloc, os.environ.get("LD_PRELOAD")) if x)
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
                   VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}"))
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", served_name,
            "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(max_loras, len(lora_modules or {}))), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port)]
    if lora_modules:
        argv += ["--lora-modules", *(f"{n}={p}" for n, p in lora_modules.items())]
    return argv + list(extra or []), env
