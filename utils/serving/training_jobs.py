"""Stage: growing the pool from examples. A few labelled rows of a new task become a LoRA that retrieval routes to.

``POST /v1/adapters/train`` takes ``{"name", "domain", "examples": [{"inputs", "targets"}, ...], "settings": {...}}``
and answers 202 with a job; ``GET /v1/adapters/train/{id}`` reports it, ``GET /v1/adapters/train`` lists the jobs,
``DELETE /v1/adapters/train/{id}`` cancels one. A job's states, as the OpenAI fine-tuning API's, locally:
``queued`` -> ``training`` -> ``ready`` (or ``failed``, ``cancelled``).

Training runs in a separate process (``spawn``), one per job, through :func:`utils.lora_training.train_one` (the
stage ``train_lora.py`` runs), on ``--training_threads`` threads and at a lower CPU priority (``nice``), so the
server keeps answering while it trains. The process loads its own copy of the base model. Its steps and losses
come back over a pipe. ``--max_training_jobs`` jobs train at once; more wait in a queue of at most
``--max_training_queue`` (past it: 429).

Of the examples, ``card_size`` (20 by default, at most a quarter of them) are held back from training and become
the adapter's card. When the process is done, its adapter (written to a temporary folder under the adapter root)
is renamed into place atomically, with its ``training.json``, and joins the pool through the same route as a runtime
load (:meth:`utils.serving.pool_admin.PoolAdmin.load`, so ``--pool_state`` keeps it). A cancelled, killed or failed
job leaves no adapter behind and the pool as it was.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from utils.serving.pool_admin import AdminError

logger = logging.getLogger(__name__)

MIN_EXAMPLES, MAX_EXAMPLES = 8, 5000
SERVER_KEYS = ("base_model", "device", "dtype")  # the server's own: a job trains on the served base model


@dataclass
class TrainJob:
    id: str
    name: str
    domain: str
    rows: list
    card: list
    settings: dict
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    losses: list = field(default_factory=list)
    error: str | None = None
    adapter_path: str | None = None
    events: list = field(default_factory=list)

    def event(self, message: str) -> None:
        self.events.append({"created_at": round(time.time(), 3), "message": message})

    def public(self) -> dict:
        now = self.finished or time.time()
        return {"object": "adapter.training_job", "id": self.id, "name": self.name, "domain": self.domain, "state": self.state,
                "created_at": round(self.created, 3), "started_at": self.started and round(self.started, 3),
                "finished_at": self.finished and round(self.finished, 3),
                "elapsed_s": round(now - self.started, 2) if self.started else 0.0, "step": self.step, "steps": self.settings["steps"],
                "losses": list(self.losses), "train_examples": len(self.rows), "card_examples": len(self.card),
                "settings": self.settings, "adapter_path": self.adapter_path, "error": self.error, "events": list(self.events)}


def _worker(spec: dict, conn) -> None:
    """The training process: its thread count and priority first, then the same stage as ``train_lora.py``."""
    threads = str(spec["threads"])
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    try:
        os.nice(spec["nice"])
    except OSError:
        pass
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        from utils.lora_training import TrainSettings, train_one
        from utils.model_loading import load_base_model, load_tokenizer

        settings = TrainSettings(**spec["settings"])
        tokenizer = load_tokenizer(settings.base_model)
        model = load_base_model(settings.base_model, dtype=settings.dtype, device=settings.device,
                           linear_kernels="torch")  # training: gradients take F.linear anyway
        record = train_one(spec["name"], spec["rows"], Path(spec["out"]), settings, tokenizer, model,
                           on_step=lambda step, loss: conn.send(("step", step, loss)))
        conn.send(("done", record))
    except BaseException as err:  # noqa: BLE001 - reported to the job, which fails with it
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


class TrainingJobs:
    """The training jobs of one server (module docstring).

    Args:
        admin: the :class:`PoolAdmin` a finished adapter joins the pool through.
        root: the adapter root the adapters are written under.
        base_model: the served base model (every job trains on it).
        max_jobs: jobs training at once.  max_queue: jobs waiting at most.  threads: CPU threads of a training process.
        nice: the training process's added niceness (0: the server's priority).  card_size: examples held back as the card.
    """

    def __init__(self, admin, root: Path, base_model: str, dtype: str = "float32", device: str = "cpu", max_jobs: int = 1,
                 max_queue: int = 8, threads: int = 1, nice: int = 10, card_size: int = 20):
        self.admin = admin
        self.root = Path(root)
        self.base_model, self.dtype, self.device = base_model, dtype, device
        self.max_jobs, self.max_queue, self.threads, self.nice, self.card_size = max_jobs, max_queue, threads, nice, card_size
        self.jobs: dict[str, TrainJob] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._running: dict[str, tuple] = {}  # id -> (process, connection, temporary folder)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- requests ------------------------------------------------------------------------------------------
    def check(self, body: dict) -> TrainJob:
        """A job from a request body; every field checked, nothing written (:class:`AdminError` otherwise)."""
        from utils.data import InputError
        from utils.lora_training import TrainSettings

        if not isinstance(body, dict):
            raise AdminError(400, "The body must be a JSON object with name, domain and examples.")
        unknown = sorted(set(body) - {"name", "domain", "examples", "settings"})
        if unknown:
            raise AdminError(400, f"Unknown fields {unknown}; send name, domain, examples and optionally settings.", unknown[0])
        name = body.get("name")
        try:
            self.admin.check_name(name)
        except AdminError as err:
            raise AdminError(400, err.message.replace("'lora_name'", "'name'"), "name") from err
        pool = self.admin.engine.pool
        if pool is None:
            raise AdminError(400, "This server was started with --no_adapters; restart it with a pool to train adapters into it.")
        if name in pool:
            raise AdminError(400, f"The adapter {name!r} is already in the pool; choose another name.", "name", "name_taken")
        with self._lock:
            if any(j.name == name and j.state in ("queued", "training") for j in self.jobs.values()):
                raise AdminError(400, f"A job is already training an adapter named {name!r}; choose another name.", "name", "name_taken")
        if (self.root / name).exists():
            raise AdminError(400, f"{self.root / name} already exists; choose another name.", "name", "name_taken")
        domain = body.get("domain", "")
        if not isinstance(domain, str):
            raise AdminError(400, "'domain' must be a string.", "domain")
        examples = body.get("examples")
        if not isinstance(examples, list) or not MIN_EXAMPLES <= len(examples) <= MAX_EXAMPLES:
            got = len(examples) if isinstance(examples, list) else type(examples).__name__
            raise AdminError(400, f"'examples' must be a list of {MIN_EXAMPLES} to {MAX_EXAMPLES} {{\"inputs\", \"targets\"}} objects "
                                  f"(got {got}).", "examples")
        rows = []
        for i, e in enumerate(examples):
            if not isinstance(e, dict) or not isinstance(e.get("inputs"), str) or not e["inputs"].strip():
                raise AdminError(400, f"'examples'[{i}] needs a non-empty string 'inputs'.", "examples")
            if not isinstance(e.get("targets"), str) or not e["targets"].strip():
                raise AdminError(400, f"'examples'[{i}] has empty 'targets'; every example needs the answer to learn.", "examples")
            rows.append({"inputs": e["inputs"], "targets": e["targets"]})
        settings = body.get("settings") or {}
        if not isinstance(settings, dict):
            raise AdminError(400, "'settings' must be an object of config/train_lora.yaml's keys.", "settings")
        known = [f.name for f in fields(TrainSettings) if f.name not in SERVER_KEYS]
        bad = sorted(set(settings) - set(known))
        if bad:
            raise AdminError(400, f"Unknown training settings {bad}; known: {known} (the base model, device and dtype are the "
                                  "server's).", "settings")
        try:
            merged = TrainSettings(**{**settings, "base_model": self.base_model, "dtype": self.dtype, "device": self.device})
        except (InputError, TypeError) as err:
            raise AdminError(400, f"'settings': {err}", "settings") from err
        n_card = min(self.card_size, len(rows) // 4)
        card, train = rows[:n_card], rows[n_card:]  # the first examples are the card, the rest train the adapter
        from dataclasses import asdict

        return TrainJob(id="trainjob-" + secrets.token_hex(8), name=name, domain=domain, rows=train, card=card, settings=asdict(merged))

    def submit(self, body: dict) -> dict:
        job = self.check(body)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise AdminError(429, f"{len(self._queue)} training jobs are waiting (--max_training_queue {self.max_queue}); retry later.",
                                 code="queue_full")
            self.jobs[job.id] = job
            self._queue.append(job.id)
            job.event(f"Job created: {len(job.rows)} training examples, {len(job.card)} held back as the card.")
        self._wake.set()
        logger.info("Training job %s queued: adapter %s, %d examples", job.id, job.name, len(job.rows))
        return job.public()

    def get(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise AdminError(404, f"No training job {job_id!r}; GET /v1/adapters/train lists them.", "id", "not_found")
        return job.public()

    def list(self) -> dict:
        return {"object": "list", "data": [j.public() for j in self.jobs.values()]}

    def cancel(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise AdminError(404, f"No training job {job_id!r}; GET /v1/adapters/train lists them.", "id", "not_found")
        with self._lock:
            if job.state == "queued":
                self._queue.remove(job_id)
                self._end(job, "cancelled", None, "Job cancelled before it started.")
            elif job.state == "training":
                self._kill(job_id)
                self._end(job, "cancelled", None, "Job cancelled while training; nothing was written.")
        return job.public()

    # -- the worker ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="lora-training", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel every job (a running one's process is stopped and its folder removed) and end the worker thread."""
        with self._lock:
            self._stop = True
            for job_id in list(self._queue):
                self._end(self.jobs[job_id], "cancelled", None, "Job cancelled: the server stopped.")
            self._queue.clear()
            for job_id in list(self._running):
                self._kill(job_id)
                self._end(self.jobs[job_id], "cancelled", None, "Job cancelled: the server stopped.")
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
                while self._queue and len(self._running) < self.max_jobs:
                    self._launch(self.jobs[self._queue.popleft()])
                running = list(self._running.items())
            if not running:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            for job_id, (proc, conn, tmp) in running:
                self._poll(self.jobs[job_id], proc, conn, tmp)
            time.sleep(0.1)

    def _launch(self, job: TrainJob) -> None:
        import multiprocessing

        tmp = self.root / f".{job.name}.{job.id}.tmp"
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        spec = {"name": job.name, "rows": job.rows, "settings": job.settings, "out": str(tmp), "threads": self.threads, "nice": self.nice}
        proc = ctx.Process(target=_worker, args=(spec, child), name=f"train-{job.name}", daemon=True)
        proc.start()
        child.close()
        self._running[job.id] = (proc, parent, tmp)
        job.state, job.started = "training", time.time()
        job.event(f"Training started in process {proc.pid} ({self.threads} thread{'s' if self.threads > 1 else ''}).")

    def _poll(self, job: TrainJob, proc, conn, tmp: Path) -> None:
        result = None
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "step":
                    job.step = msg[1]
                    job.losses.append(msg[2])
                else:
                    result = msg
        except (EOFError, OSError):
            pass
        if result is None and proc.is_alive():
            return
        with self._lock:
            if job.id not in self._running:  # cancelled meanwhile
                return
            self._running.pop(job.id)
        proc.join(10)
        if result is None:
            code = proc.exitcode
            why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            self._fail(job, tmp, f"The training process ended without a result ({why}).")
        elif result[0] == "error":
            self._fail(job, tmp, f"Training failed: {result[1]}")
        else:
            self._finish(job, tmp)

    def _finish(self, job: TrainJob, tmp: Path) -> None:
        final = self.root / job.name
        try:
            if final.exists():
                raise AdminError(400, f"{final} appeared while the job trained; the adapter was not moved there.")
            os.replace(tmp, final)
            job.adapter_path = str(final)
            self.admin.load({"lora_name": job.name, "lora_path": str(final), "domain": job.domain,
                             "samples": [r["inputs"] for r in job.card] or None})
        except AdminError as err:
            shutil.rmtree(final if job.adapter_path else tmp, ignore_errors=True)
            job.adapter_path = None
            self._fail(job, tmp, f"The trained adapter could not join the pool: {err.message}")
            return
        with self._lock:
            self._end(job, "ready", None, f"Adapter {job.name} joined the pool" + (" and retrieval." if job.card else "."))
        logger.info("Training job %s ready: %s", job.id, final)

    def _fail(self, job: TrainJob, tmp: Path, message: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            if job.state in ("queued", "training"):
                self._end(job, "failed", message, message)
        logger.error("Training job %s failed: %s", job.id, message)

    def _kill(self, job_id: str) -> None:
        proc, conn, tmp = self._running.pop(job_id)
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
        shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _end(job: TrainJob, state: str, error: str | None, message: str) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        job.event(message)
