"""The engine: a bounded queue in front of one worker thread that owns the pipelines.

Protocol adapters call :meth:`Engine.generate` from the event loop; it enqueues and awaits a
``concurrent.futures.Future`` without blocking the loop. The worker takes the oldest job, adds
queued jobs with the same batch key (up to ``max_batch_images`` images, waiting at most
``max_wait_ms`` for more), runs them as one batch and resolves their futures. A failing batch
fails only its own requests; the worker carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import metrics
from .errors import GenerationFailed, QueueFull, ShuttingDown
from .request import GenerationRequest, GenerationResult

log = logging.getLogger("sdserve")

# (requests) -> images per request; the PipelineRunner in production, anything callable in tests.
BatchFunction = Callable[[Sequence[GenerationRequest]], list]


@dataclass(frozen=True)
class EngineSettings:
    max_batch_images: int = 4
    max_wait_ms: float = 0.0
    max_queue: int = 32
    retry_after_s: int = 5

    def __post_init__(self) -> None:
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be at least 1, got {self.max_batch_images}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")


@dataclass
class Job:
    request: GenerationRequest
    request_id: str
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)


class Engine:
    """Owns the queue and the single worker thread that calls ``batch_fn``."""

    def __init__(self, batch_fn: BatchFunction, settings: EngineSettings):
        self._batch_fn = batch_fn
        self.settings = settings
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sdserve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking work; queued jobs fail with ShuttingDown, the running batch finishes."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown())
        metrics.QUEUE_DEPTH.set(0)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # -- submitting ------------------------------------------------------------------------
    def submit(self, requests: Sequence[GenerationRequest], request_id: str) -> list[Future]:
        """Enqueue all of ``requests`` or none (QueueFull / ShuttingDown)."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(self._pending) + len(requests) > self.settings.max_queue:
                metrics.FAILURES.labels(reason="queue_full").inc()
                raise QueueFull(self.settings.max_queue, self.settings.retry_after_s)
            jobs = [Job(r, request_id) for r in requests]
            self._pending.extend(jobs)
            metrics.QUEUE_DEPTH.set(len(self._pending))
            self._cond.notify_all()
        return [job.future for job in jobs]

    async def generate(self, requests: Sequence[GenerationRequest], request_id: str) -> list[GenerationResult]:
        """Submit and await results without blocking the event loop; cancelling the await
        cancels jobs that have not started yet."""
        futures = self.submit(requests, request_id)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    # -- the worker ------------------------------------------------------------------------
    def _next_batch(self) -> list[Job]:
        """Block for the oldest job, then gather compatible queued jobs into its batch."""
        s = self.settings
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            head = self._pending.popleft()
            batch, images = [head], head.request.num_images
            key = head.request.batch_key()
            deadline = time.perf_counter() + s.max_wait_ms / 1000
            while images < s.max_batch_images:
                for job in list(self._pending):
                    n = job.request.num_images
                    if images + n <= s.max_batch_images and job.request.batch_key() == key:
                        self._pending.remove(job)
                        batch.append(job)
                        images += n
                remaining = deadline - time.perf_counter()
                if images >= s.max_batch_images or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            metrics.QUEUE_DEPTH.set(len(self._pending))
        # Jobs whose caller went away (cancelled future) are dropped here, before any work.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while not self._stopping:
            batch = self._next_batch()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        try:
            images = self._batch_fn([job.request for job in batch])
        except Exception as exc:  # noqa: BLE001 - any failure must reach the callers, not kill the worker
            if len(batch) > 1:
                # Rerun one by one so a request that breaks the pipeline fails alone.
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(batch), exc)
                for job in batch:
                    self._run_single_retry(job)
                return
            self._fail(batch[0], exc)
            return
        self._complete(batch, images, started)

    def _run_single_retry(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            images = self._batch_fn([job.request])
        except Exception as exc:  # noqa: BLE001
            self._fail(job, exc)
        else:
            self._complete([job], images, started)

    def _complete(self, batch: list[Job], images: list, started: float) -> None:
        elapsed = time.perf_counter() - started
        total = sum(len(i) for i in images)
        metrics.BATCH_IMAGES.observe(total)
        metrics.IMAGES.inc(total)
        metrics.GENERATION_SECONDS.observe(elapsed)
        for job, job_images in zip(batch, images):
            metrics.QUEUE_SECONDS.observe(started - job.enqueued_at)
            job.future.set_result(
                GenerationResult(
                    images=job_images,
                    seeds=job.request.seeds,
                    queue_seconds=started - job.enqueued_at,
                    generate_seconds=elapsed,
                    batch_images=total,
                )
            )

    def _fail(self, job: Job, exc: Exception) -> None:
        log.error("request %s failed in the pipeline: %s", job.request_id, exc, exc_info=exc)
        metrics.FAILURES.labels(reason="generation_error").inc()
        job.future.set_exception(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))
