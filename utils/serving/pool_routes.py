"""Stage: the server's pool routes. Runtime loads and unloads (vLLM's ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``, :mod:`utils.serving.pool_admin`) and training jobs (``POST /v1/adapters/train``,
``GET``/``DELETE /v1/adapters/train/{id}``, :mod:`utils.serving.training_jobs`).

A change to the pool needs the API key when one is set, else a loopback bind; it runs on a worker thread, and an
:class:`utils.serving.pool_admin.AdminError` becomes the usual 4xx JSON error.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from utils.serving.pool_admin import AdminError, is_loopback
from utils.serving.protocol import APIError, Requests


class PoolRoutes:
    """The pool and training routes over one :class:`utils.serving.pool_admin.PoolAdmin` (and training jobs)."""

    def __init__(self, requests: Requests, admin, training=None, bind_host: str = "127.0.0.1", max_train_body_bytes: int = 32 << 20):
        self.requests, self.admin, self.training = requests, admin, training
        self.bind_host, self.max_train_body_bytes = bind_host, max_train_body_bytes

    async def change(self, request: Request, fn, body_limit: int | None = None, status: int = 200, read_body: bool = True):
        """A runtime pool change: the API key when one is set, else a loopback bind."""
        checks = self.requests
        checks.check_auth(request)
        if checks.api_key is None and not is_loopback(self.bind_host):
            raise APIError(403, f"Pool changes need an API key when the server binds {self.bind_host}: restart it with --api_key, or bind "
                                "127.0.0.1.", code="forbidden", type_="permission_error")
        body = (await checks.read_json(request, body_limit, "--max_train_body_bytes" if body_limit else "--max_body_bytes")
                if read_body else None)
        try:
            return JSONResponse(await asyncio.to_thread(fn, body), status_code=status)
        except AdminError as err:
            raise APIError(err.status, err.message, param=err.param, code=err.code,
                           headers={"Retry-After": "5"} if err.status == 429 else None) from err

    def job(self, request: Request, job_id: str) -> dict:
        self.requests.check_auth(request)
        try:
            return self.training.get(job_id)
        except AdminError as err:
            raise APIError(err.status, err.message, param=err.param, code=err.code) from err

    def add_to(self, app: FastAPI) -> None:
        admin, training = self.admin, self.training

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request):
            return await self.change(request, admin.load)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request):
            return await self.change(request, admin.unload)

        if training is None:
            return

        @app.post("/v1/adapters/train")
        async def train_adapter(request: Request):
            return await self.change(request, training.submit, body_limit=self.max_train_body_bytes, status=202)

        @app.get("/v1/adapters/train")
        async def training_jobs(request: Request):
            self.requests.check_auth(request)
            return training.list()

        @app.get("/v1/adapters/train/{job_id}")
        async def training_job(request: Request, job_id: str):
            return self.job(request, job_id)

        @app.delete("/v1/adapters/train/{job_id}")
        async def cancel_training_job(request: Request, job_id: str):
            return await self.change(request, lambda _: training.cancel(job_id), read_body=False)
