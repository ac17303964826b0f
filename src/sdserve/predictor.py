"""The ``kserve.Model``: glue between KServe's data plane and sdserve's engine.

``load()`` builds the model store and the engine (once, before the server opens its ports);
``predict()`` hands a v1 dict or a v2 ``InferRequest`` to its protocol adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable

import kserve
from kserve import InferRequest
from kserve.errors import InvalidInput

from . import metrics, model_store, storage
from .engine import Engine, EngineSettings
from .protocol import openai_images, v1, v2
from .request import Limits, RequestParser
from .runner import PipelineRunner

log = logging.getLogger("sdserve")


@dataclass(frozen=True)
class ModelSettings:
    model_dir: str
    refiner_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    default_steps: int | None = None
    download_dir: str | None = None  # where remote model locations are downloaded to


class SDModel(kserve.Model):
    """A text-to-image model served over KServe v1, v2 REST and v2 gRPC."""

    def __init__(self, name: str, settings: ModelSettings, limits: Limits, engine_settings: EngineSettings):
        super().__init__(name, return_response_headers=True)
        self.settings = settings
        self.limits = limits
        self.engine_settings = engine_settings
        self.loaded: model_store.LoadedModel | None = None
        self.parser: RequestParser | None = None
        # Not ``self.engine``: kserve reads that attribute as "has an async engine to start".
        self.batch_engine: Engine | None = None

    def load(self) -> bool:
        s = self.settings
        model_dir = storage.local_path(s.model_dir, s.download_dir)
        refiner_dir = storage.local_path(s.refiner_dir, s.download_dir) if s.refiner_dir else None
        layout = model_store.discover(model_dir, refiner_dir)
        device = model_store.resolve_device(s.device)
        dtype = model_store.resolve_dtype(s.dtype, device)
        started = time.perf_counter()
        self.loaded = model_store.load(layout, device, dtype, s.default_steps)
        self.parser = RequestParser(self.limits, self.loaded.capabilities)
        runner = PipelineRunner(self.loaded, self.engine_settings.max_batch_images)
        self.batch_engine = Engine(runner.run, self.engine_settings)
        self.batch_engine.start()
        log.info(
            "model %s ready in %.1f s: %s%s on %s (%s)",
            self.name,
            time.perf_counter() - started,
            self.loaded.capabilities.pipeline_class,
            " + refiner" if self.loaded.refiner is not None else "",
            device,
            dtype,
        )
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.batch_engine is not None:
            self.batch_engine.stop(timeout=30)
        self.ready = False

    async def healthy(self) -> bool:
        return self.ready and self.batch_engine is not None and self.batch_engine.alive

    def get_input_types(self) -> list[dict]:
        return v2.INPUT_METADATA

    def get_output_types(self) -> list[dict]:
        return v2.OUTPUT_METADATA

    async def predict(
        self,
        payload: dict | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Any:
        request_id = (headers or {}).get("x-request-id") or uuid.uuid4().hex
        if response_headers is not None:
            response_headers["x-request-id"] = request_id
        if not isinstance(payload, InferRequest):
            return await self._tracked("v1", request_id, self._predict_v1(payload, request_id))
        protocol = "grpc" if payload.from_grpc else "v2"
        return await self._tracked(protocol, request_id, self._predict_v2(payload, request_id))

    async def generate_openai(self, body: Any, request_id: str) -> dict:
        """The OpenAI Images API route's work (the route itself lives in routes.py)."""
        return await self._tracked("openai", request_id, self._predict_openai(body, request_id))

    async def _tracked(self, protocol: str, request_id: str, work: Awaitable[Any]) -> Any:
        """Count, time and log one request of any protocol."""
        metrics.REQUESTS.labels(protocol=protocol).inc()
        started = time.perf_counter()
        try:
            response = await work
        except InvalidInput as exc:
            metrics.FAILURES.labels(reason="invalid_input").inc()
            log.info("request %s rejected: %s", request_id, exc.reason)
            raise
        metrics.REQUEST_SECONDS.labels(protocol=protocol).observe(time.perf_counter() - started)
        return response

    async def _predict_v1(self, payload: Any, request_id: str) -> dict:
        requests = v1.parse_v1(payload, self.parser)
        results = await self.batch_engine.generate(requests, request_id)
        predictions = await asyncio.to_thread(
            lambda: [v1.encode_prediction(r, res, self.name) for r, res in zip(requests, results)]
        )
        return {"predictions": predictions}

    async def _predict_v2(self, payload: InferRequest, request_id: str):
        call = v2.parse_v2(payload, self.parser, request_id)
        results = await self.batch_engine.generate(call.requests, request_id)
        return await asyncio.to_thread(v2.encode_response, call, results, self.name)

    async def _predict_openai(self, body: Any, request_id: str) -> dict:
        request = openai_images.parse_openai(body, self.parser, self.name)
        (result,) = await self.batch_engine.generate([request], request_id)
        return await asyncio.to_thread(openai_images.encode_openai, request, result, self.name)
