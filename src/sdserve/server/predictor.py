"""The ``kserve.Model``: glue between KServe's data plane and sdserve's engine.

``load()`` starts the engine, whose worker loads the model (once, before the server opens its
ports); ``predict()`` hands a v1 dict or a v2 ``InferRequest`` to its protocol adapter, and
``generate_openai()`` does the same for the OpenAI route (or, with ``stream: true``, queues the
request and gives back its event stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import kserve
from kserve import InferRequest
from kserve.errors import InvalidInput

from .. import metrics
from ..adapters import AdapterFetchError, Adapters
from ..errors import (
    AdapterUnavailable,
    DeadlineExceeded,
    ImageTooLarge,
    QueueFull,
    ShuttingDown,
    Unauthorized,
)
from ..generation import Engine, EngineSettings, ModelBackend
from ..generation.preview import Previewer
from ..models import loading
from ..protocol import openai_images, v1, v2
from ..protocol.openai_stream import ImageStream
from ..request.prompts import PromptReport, prompt_report
from ..request.types import GenerationRequest, Limits
from ..request.validation import RequestParser
from . import model_setup
from .model_setup import ModelSettings
from .request_policy import Call, Policy, admit

log = logging.getLogger("sdserve")


class SDModel(kserve.Model):
    """A text-to-image model served over KServe v1, v2 REST and v2 gRPC (and the OpenAI route)."""

    def __init__(
        self,
        name: str,
        settings: ModelSettings,
        limits: Limits,
        engine_settings: EngineSettings,
        policy: Policy = Policy(),
    ):
        super().__init__(name, return_response_headers=True)
        self.settings = settings
        self.limits = limits
        self.engine_settings = engine_settings
        self.policy = policy
        self.loaded: loading.LoadedModel | None = None
        self.parser: RequestParser | None = None
        self.tokenizers: dict = {}
        self.weighted_tokenizers: dict = {}
        self.adapters: Adapters | None = None
        self.controls = None  # the ControlCatalog of an SD/SDXL model
        # Not ``self.engine``: kserve reads that attribute as "has an async engine to start".
        self.batch_engine: Engine | None = None
        self.draining = False
        self.previewer: Previewer | None = None  # built at model load, for partial images
        self.preview_error: str | None = None  # why this model has no previews (previewer None)

    def load(self) -> bool:
        """Load, optimise and warm up on the worker thread, and return once it can generate.

        The worker does it all because it owns the pipelines from the first tensor on: on a CPU,
        a second thread running torch work gets its own OpenMP pool, and the two slow each other
        down severalfold; on a GPU, CUDA graphs are recorded per thread."""
        self.batch_engine = Engine(self.engine_settings)
        self.batch_engine.start(self._prepare, self._warmup).result()
        self.ready = True
        return self.ready

    def _prepare(self) -> ModelBackend:
        served = model_setup.prepare(self.name, self.settings, self.limits)
        self.loaded, self.adapters, self.parser = served.loaded, served.adapters, served.parser
        self.controls = served.controls
        self.tokenizers, self.weighted_tokenizers = served.tokenizers, served.weighted_tokenizers
        self.previewer, self.preview_error = served.previewer, served.preview_error
        return served.backend

    def _warmup(self) -> list[tuple[str, list[GenerationRequest]]]:
        return model_setup.warmup_plan(self.parser, self.settings.optimizations.warmup,
                                       self.engine_settings.max_batch_images)

    # -- lifecycle and health ----------------------------------------------------------------
    def stop(self) -> None:
        # Called at shutdown, after the SIGTERM drain has already waited the grace period: a worker
        # still busy now is stuck, and the process exits without it.
        if self.batch_engine is not None:
            self.batch_engine.stop(timeout=5)
        self.ready = False

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting requests (503) and wait up to ``grace_s`` for queued and running ones."""
        self.draining = True
        if self.batch_engine is None:
            return True
        self.batch_engine.drain()
        return await asyncio.to_thread(self.batch_engine.wait_idle, grace_s)

    def worker_stuck(self) -> bool:
        return self.batch_engine is not None and self.batch_engine.busy_seconds() > self.policy.stuck_after_s

    def not_ready_reason(self) -> str | None:
        """Why the model should get no traffic now, or None when it is ready."""
        if not self.ready or self.batch_engine is None:
            return "model not loaded"
        if self.draining:
            return "shutting down"
        if not self.batch_engine.alive:
            return "generation worker stopped"
        if self.worker_stuck():
            return f"generation worker stuck in one step for over {self.policy.stuck_after_s:.0f} s"
        return None

    async def healthy(self) -> bool:
        return self.not_ready_reason() is None

    def describe(self) -> dict[str, Any]:
        """What is served: shown by GET /v1/models/<name> and in the v2 model metadata."""
        caps = self.loaded.capabilities
        out = {
            "pipeline": caps.pipeline_class,
            "refiner": caps.has_refiner,
            "default_size": [caps.default_width, caps.default_height],
            "adapters": self.adapters.names() if self.adapters else [],
            # what a request may start from: text, an image (img2img), an image and a mask (inpaint)
            "inputs": ["image"] if caps.needs_image else ["image", "mask"] if caps.needs_mask else
            ["text", "image", "mask"],
        }
        prompts = self.parser.prompts  # each only when there is something to show
        if prompts.default_syntax != "plain":
            out["prompt_syntax"] = prompts.default_syntax
        if prompts.embeddings:
            out["embeddings"] = sorted(prompts.embeddings)
        if self.controls is not None and self.controls.names():
            out["controls"] = [{"name": n, "kind": self.controls.get(n).kind} for n in self.controls.names()]
        if self.adapters is not None:  # each only when there is something to show
            if found := self.adapters.recipes():
                out["recipes"] = {name: recipe.describe() for name, recipe in found.items()}
            if self.adapters.fused is not None:
                out["fused_lora"] = self.adapters.fused.describe()
        return out

    def get_input_types(self) -> list[dict]:
        return v2.INPUT_METADATA

    def get_output_types(self) -> list[dict]:
        return v2.OUTPUT_METADATA

    # -- requests ------------------------------------------------------------------------------
    async def predict(
        self,
        payload: dict | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Any:
        headers = headers or {}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        if response_headers is not None:
            response_headers["x-request-id"] = request_id
        if not isinstance(payload, InferRequest):
            return await self._tracked("v1", headers, request_id, lambda call: self._predict_v1(payload, call))
        protocol = "grpc" if payload.from_grpc else "v2"
        return await self._tracked(protocol, headers, request_id, lambda call: self._predict_v2(payload, call))

    async def generate_openai(self, body: Any, headers: dict[str, str], request_id: str) -> dict | ImageStream:
        """The OpenAI Images API route's work (the route itself lives in routes.py): the response
        body, or for ``stream: true`` the stream of a request already queued."""
        return await self._tracked("openai", headers, request_id, lambda call: self._predict_openai(body, call))

    async def _tracked(self, protocol: str, headers: dict[str, str], request_id: str, work) -> Any:
        """Admit, count, time and log one request of any protocol; ``work(call)`` does the rest."""
        metrics.REQUESTS.labels(protocol=protocol).inc()
        started = time.perf_counter()
        try:
            response = await work(admit(self.policy, headers, request_id))
        except InvalidInput as exc:
            metrics.FAILURES.labels(reason="invalid_input").inc()
            log.info("request %s rejected: %s", request_id, exc.reason)
            raise
        except Unauthorized:
            metrics.FAILURES.labels(reason="unauthorized").inc()
            log.info("request %s rejected: no valid bearer token", request_id)
            raise
        except (DeadlineExceeded, ImageTooLarge, ShuttingDown, QueueFull) as exc:
            log.info("request %s: %s", request_id, exc)
            raise
        except AdapterUnavailable as exc:
            metrics.FAILURES.labels(reason="adapter_unavailable").inc()
            log.error("request %s failed: %s", request_id, exc)
            raise
        if not isinstance(response, ImageStream):  # a stream times itself, when it ends
            metrics.REQUEST_SECONDS.labels(protocol=protocol).observe(time.perf_counter() - started)
        return response

    def _reports(self, requests: list[GenerationRequest], where: str = "") -> list[PromptReport]:
        """What each request's text encoders read (400 for a weighted prompt over --max_prompt_tokens)."""
        reports = []
        for i, request in enumerate(requests):
            try:
                reports.append(prompt_report(self.tokenizers, self.weighted_tokenizers, request,
                                             self.limits.max_prompt_tokens, self.parser.prompts.embeddings))
            except InvalidInput as exc:
                raise InvalidInput(f"{where.format(i)}{exc.reason}") from None
        return reports

    async def _fetch_adapters(self, requests: list[GenerationRequest]) -> None:
        """Download the adapters ``requests`` name that are not on local disk yet (a remote
        store's, on first use), in a thread, before they queue: the worker never waits on a
        download."""
        names = {name for r in requests for name, _ in r.loras}
        if names:
            try:
                await asyncio.to_thread(self.adapters.fetch, sorted(names))
            except AdapterFetchError as exc:
                raise AdapterUnavailable(str(exc)) from None

    async def _predict_v1(self, payload: Any, call: Call) -> dict:
        requests = v1.parse_v1(payload, self.parser)
        reports = self._reports(requests, "instances[{}].")
        await self._fetch_adapters(requests)
        results = await self.batch_engine.generate(requests, call.request_id, call.timeout_s)
        predictions = await asyncio.to_thread(
            lambda: [v1.encode_prediction(request, result, report.warnings, self.name, report.tokens)
                     for request, result, report in zip(requests, results, reports)]
        )
        return {"predictions": predictions}

    async def _predict_v2(self, payload: InferRequest, call: Call):
        parsed = v2.parse_v2(payload, self.parser, call.request_id)
        reports = self._reports(parsed.requests)
        await self._fetch_adapters(parsed.requests)
        results = await self.batch_engine.generate(parsed.requests, call.request_id, call.timeout_s)
        return await asyncio.to_thread(v2.encode_response, parsed, results, self.name,
                                       [w for r in reports for w in r.warnings], [r.tokens for r in reports])

    async def _predict_openai(self, body: Any, call: Call) -> dict | ImageStream:
        parsed = openai_images.parse_openai_request(body, self.parser, self.name)
        request = parsed.request
        (report,) = self._reports([request])
        warnings = report.warnings
        await self._fetch_adapters([request])
        if parsed.stream is not None:
            previewer = self._previewer() if parsed.stream.partial_images else None
            stream = ImageStream(parsed, self.name, call.request_id, call.timeout_s, previewer,
                                 self._prompt_tokens(request), warnings)
            stream.submit(self.batch_engine)  # a full queue is still a plain 503, before any event
            return stream
        (result,) = await self.batch_engine.generate([request], call.request_id, call.timeout_s)
        return await asyncio.to_thread(openai_images.encode_openai, request, result, self.name, warnings, report.tokens)

    def _previewer(self) -> Previewer:
        """The cheap previewer for partial images (never the model's VAE)."""
        if self.previewer is None:
            raise InvalidInput(f"partial_images: this model has no previews ({self.preview_error}); leave it 0")
        return self.previewer

    def _prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt's tokens as the first text encoder's tokenizer counts them (start and end
        markers included, before truncation): the text_tokens of a stream's usage."""
        tokenizer = self.tokenizers.get("tokenizer") or self.tokenizers.get("tokenizer_2")
        if tokenizer is None or not request.prompt:
            return 0
        return len(tokenizer(request.prompt, truncation=False, verbose=False).input_ids)
