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

This module: :class:`VllmClient` talks to a server (a vLLM that is down, stalls or answers 5xx raises
:class:`EngineUnavailable`, which the server turns into a 503); :class:`Replicas` sends each composition to the same
one of several vLLM servers (adapter affinity); :func:`generate_rows` is the evaluation's generation through them
(``main.py --engine vllm``). The compositions registered on each server are :mod:`utils.vllm_compositions`'s; the
command that starts vLLM for a pool is :mod:`utils.vllm_launch`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from utils.vllm_compositions import ComposedAdapters

logger = logging.getLogger(__name__)



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
