"""``stream: true`` on the OpenAI Images API: server-sent events, as OpenAI streams them and the
``openai`` SDK reads them (``client.images.generate(..., stream=True, partial_images=2)``).

Each event is ``event: <type>`` and ``data: <one JSON line>`` and a blank line. Per image,
``partial_images`` previews (``image_generation.partial_image``, or ``image_edit.partial_image``
for edits; ``partial_image_index`` from 0), spread over its steps, then one ``*.completed`` event
with the final image, byte for byte the one a plain request gets. After the last completed event
the stream ends; no ``[DONE]``. Every image event carries sdserve's ``seed`` and ``image_index``.

A failure after the stream started (the request failed, or its deadline passed) is one
``event: error`` with ``{"type": "error", "error": {<OpenAI's error shape>}}`` (the SDK raises it
as ``openai.APIError``), then the end. ``stream_progress: true`` adds ``sdserve.progress`` events:
the queue position while queued (every 0.5 s), then each step of each image. Without it, a quiet
stream gets an SSE comment every 15 s, so that proxies keep it open.

Previews never run the model's VAE: the progress hook maps the step's predicted clean latents to
RGB on the worker thread (``generation.preview.Previewer``), and the event loop encodes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from .. import metrics
from ..generation.admission import Job, Progress
from .image_encoding import b64, encode_image
from .openai_images import OpenAIRequest, encode_final, error_body

log = logging.getLogger("sdserve")

PROGRESS_EVENT = "sdserve.progress"
QUEUE_POLL_S = 0.5  # how often a queued request's position is sent (stream_progress)
KEEPALIVE_S = 15.0  # longest silence before an SSE comment


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def partial_steps(steps: int, partial_images: int) -> dict[int, int]:
    """After which of an image's ``steps`` each preview is made -> its partial_image_index: at
    round(k * steps / (partial_images + 1)), k = 1..partial_images. None after the last step (the
    final image comes right then) and one per step at most, so few steps give fewer previews, as
    OpenAI allows."""
    chosen = {round(k * steps / (partial_images + 1)) for k in range(1, partial_images + 1)}
    return {step: i for i, step in enumerate(sorted(s for s in chosen if 1 <= s < steps))}


def usage(text_tokens: int, input_images: int, output_images: int) -> dict[str, Any]:
    """OpenAI's usage shape. sdserve does not tokenize images: an input image counts as one image
    token and a finished image as one output token."""
    return {
        "input_tokens": text_tokens + input_images,
        "input_tokens_details": {"image_tokens": input_images, "text_tokens": text_tokens},
        "output_tokens": output_images,
        "total_tokens": text_tokens + input_images + output_images,
    }


def error_event(exc: BaseException) -> bytes:
    status = getattr(exc, "http_status", 500)
    code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()  # DeadlineExceeded -> deadline_exceeded
    body = error_body(str(exc), "invalid_request_error" if status < 500 else "server_error", code)
    return sse("error", {"type": "error", **body})


class ImageStream:
    """One streamed request: a progress hook for the worker thread, and its events for the client.

    Built on the event loop; :meth:`submit` queues the request (so a full queue is still a plain
    503), :meth:`body` gives the SSE bytes. A client that goes away closes the body, which abandons
    the request: its images stop at the next step."""

    def __init__(self, parsed: OpenAIRequest, model_name: str, request_id: str, timeout_s: float,
                 previewer=None, prompt_tokens: int = 0, warnings: list[str] | None = None):
        self.parsed, self.request = parsed, parsed.request
        self.model_name, self.request_id, self.timeout_s = model_name, request_id, timeout_s
        self.options = parsed.stream
        self.previewer = previewer if self.options.partial_images else None
        self.prompt_tokens, self.warnings = prompt_tokens, warnings or []
        self.kind = "image_edit" if parsed.edit else "image_generation"
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()  # (kind, ...) from the worker, in order
        self.plans: dict[int, dict[int, int]] = {}  # image index -> partial_steps; worker thread only
        self.engine = None
        self.job: Job | None = None
        self.previews_sent = 0
        self.closed = False  # the request was stopped: the hook does no more work
        self.finished = False  # every event was made (the last may be an error)
        self.started = time.perf_counter()

    # -- the worker thread's side ------------------------------------------------------------
    def submit(self, engine) -> None:
        self.engine = engine
        (self.job,) = engine.submit([self.request], self.request_id, time.monotonic() + self.timeout_s,
                                    self.on_progress)
        self.job.future.add_done_callback(lambda _: self._put(("done",)))

    def on_progress(self, progress: Progress) -> None:
        """After each step of an image, on the worker thread: a preview when one is due (it copies
        what it needs, so no tensor outlives the call), and the step for stream_progress."""
        if self.closed:
            return
        if self.options.progress:
            self._put(("step", progress.image_index, progress.step, progress.steps))
        if self.previewer is None:
            return
        plan = self.plans.setdefault(progress.image_index, partial_steps(progress.steps, self.options.partial_images))
        index = plan.get(progress.step)
        if index is not None:
            latents = progress.denoised if progress.denoised is not None else progress.latents
            try:
                self._put(("partial", progress.image_index, index, self.previewer(latents)))
            except Exception:  # noqa: BLE001 - a missing preview must not fail the image
                log.exception("request %s: preview of image %d failed", self.request_id, progress.image_index)

    def _put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    # -- the event loop's side ---------------------------------------------------------------
    async def body(self) -> AsyncIterator[bytes]:
        metrics.OPEN_STREAMS.inc()
        try:
            async for chunk in self._events():
                yield chunk
            self.finished = True
        finally:
            metrics.OPEN_STREAMS.dec()
            self.close()

    def close(self) -> None:
        """The response is over: if the events are not all out, the client went away, so stop."""
        if not self.finished and not self.closed:
            log.info("request %s: client left the stream; stopping its images", self.request_id)
            self._abandon(count_queued=True)

    async def _events(self) -> AsyncIterator[bytes]:
        deadline = self.loop.time() + self.timeout_s
        quiet_since = self.loop.time()
        if self.options.progress and self._queue_position() is not None:
            yield self._queued()
        while True:
            queued = self.options.progress and self.job.admitted_at is None
            wait = min(QUEUE_POLL_S if queued else KEEPALIVE_S, deadline - self.loop.time())
            try:
                if wait <= 0:
                    raise TimeoutError
                item = await asyncio.wait_for(self.items.get(), wait)
            except TimeoutError:
                if self.loop.time() >= deadline:
                    metrics.FAILURES.labels(reason="deadline").inc()
                    self._abandon(count_queued=False)
                    yield error_event(self.job.deadline_error())
                    return
                if queued and self._queue_position() is not None:
                    yield self._queued()
                elif self.loop.time() - quiet_since >= KEEPALIVE_S:
                    quiet_since = self.loop.time()
                    yield b": keep-alive\n\n"
                continue
            quiet_since = self.loop.time()
            if item[0] == "done":
                break
            if item[0] == "step":
                _, index, step, steps = item
                yield sse(PROGRESS_EVENT, {"type": PROGRESS_EVENT, "step": step, "steps": steps,
                                           "image_index": index, "queue_position": None})
            else:
                yield await self._partial(*item[1:])
        future = self.job.future
        if future.cancelled() or future.exception() is not None:
            yield error_event(future.exception() if not future.cancelled() else self.job.deadline_error())
            return
        result = future.result()
        for index, (image, seed) in enumerate(zip(result.images, result.seeds)):
            encoded = await asyncio.to_thread(encode_final, self.request, image, seed, self.model_name)
            data = {**self._common(f"{self.kind}.completed", encoded, seed, index),
                    "usage": usage(self.prompt_tokens, self.parsed.input_images, index + 1)}
            if self.warnings:
                data["warnings"] = self.warnings
            yield sse(data["type"], data)
        metrics.REQUEST_SECONDS.labels(protocol="openai").observe(time.perf_counter() - self.started)

    async def _partial(self, image_index: int, partial_index: int, array) -> bytes:
        r = self.request  # the request's own format; no PNG metadata: a preview reproduces nothing
        encoded = await asyncio.to_thread(lambda: b64(encode_image(array, r.image_format, r.quality)))
        if not self.previews_sent:
            metrics.FIRST_PARTIAL_SECONDS.observe(time.perf_counter() - self.started)
        self.previews_sent += 1
        data = {**self._common(f"{self.kind}.partial_image", encoded, r.seeds[image_index], image_index),
                "partial_image_index": partial_index}
        return sse(data["type"], data)

    def _common(self, kind: str, encoded: str, seed: int, image_index: int) -> dict[str, Any]:
        r = self.request
        return {"type": kind, "b64_json": encoded, "created_at": int(time.time()), "size": f"{r.width}x{r.height}",
                "quality": self.parsed.quality, "background": self.parsed.background,
                "output_format": r.image_format, "seed": seed, "image_index": image_index}

    def _queue_position(self) -> int | None:
        return self.engine.queue_position(self.job)

    def _queued(self) -> bytes:
        return sse(PROGRESS_EVENT, {"type": PROGRESS_EVENT, "step": 0, "steps": None, "image_index": None,
                                    "queue_position": self._queue_position()})

    def _abandon(self, count_queued: bool) -> None:
        """Stop the request: dropped if still queued, its images stopped at the next step if
        running (the step loop counts those as interrupted; a queued one is counted here)."""
        self.closed = True
        if self.job is None:
            return
        if self.job.future.cancel() and count_queued:
            metrics.FAILURES.labels(reason="interrupted").inc()
        self.job.abandon()


class EventStreamResponse(StreamingResponse):
    """A stream's response. It always watches for the client leaving (Starlette does only for
    ASGI before 2.4; after, it notices at the next failed send, which a quiet stream may not make
    for minutes) and then stops the request at once, so its images stop at the next step."""

    media_type = "text/event-stream"

    def __init__(self, stream: ImageStream, headers: dict[str, str]):
        super().__init__(stream.body(), headers=headers)
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        sending = asyncio.ensure_future(self.stream_response(send))
        listening = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({sending, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (listening, sending):
                task.cancel()
            await asyncio.gather(listening, sending, return_exceptions=True)
            await self.body_iterator.aclose()
            self.stream.close()  # (also when the body never started)
        error = None if sending.cancelled() else sending.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the client is gone
            raise error
