"""The engine: a bounded queue in front of one worker thread that owns the pipelines.

Protocol adapters call :meth:`Engine.generate` from the event loop; it enqueues and awaits a
``concurrent.futures.Future`` without blocking the loop. The worker takes the oldest job, adds
queued jobs with the same batch key (up to ``max_batch_images`` images, waiting at most
``max_wait_ms`` for more), runs them as one batch and resolves their futures. A failing batch
fails only its own requests; the worker carries on.

A job is *gone* when its caller stopped waiting (client disconnected, request cancelled) or its
deadline passed. Gone jobs are never started, and a running batch whose jobs are all gone stops
at the next denoising step.
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
from .errors import DeadlineExceeded, GenerationFailed, ImageTooLarge, Interrupted, QueueFull, ShuttingDown
from .request import GenerationRequest, GenerationResult

log = logging.getLogger("sdserve")

# (requests, should_stop) -> images per request. The PipelineRunner in production; it polls
# should_stop() between denoising steps and raises Interrupted when it turns true.
BatchFunction = Callable[[Sequence[GenerationRequest], Callable[[], bool]], list]


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
    deadline: float | None = None  # time.monotonic() after which nobody wants the result
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def abandon(self) -> None:
        """The caller stopped waiting: drop the job if queued, let a running batch stop early."""
        self.abandoned.set()
        self.future.cancel()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def gone(self) -> bool:
        return self.abandoned.is_set() or self.expired()

    def deadline_error(self) -> DeadlineExceeded:
        waited = time.monotonic() - self.enqueued_at
        return DeadlineExceeded(f"request deadline passed after {waited:.1f} s; the generation was stopped")


class Engine:
    """Owns the queue and the single worker thread that calls ``batch_fn``."""

    def __init__(self, batch_fn: BatchFunction, settings: EngineSettings):
        self._batch_fn = batch_fn
        self.settings = settings
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._batch_started: float | None = None  # when the running batch began, None when idle
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, first: Callable[[], None] | None = None) -> Future:
        """Start the worker. It runs ``first`` (e.g. a compile warm-up, which must happen on the
        thread that will generate) before any request; the returned future tells when it is done."""
        warmed: Future = Future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, args=(first, warmed), name="sdserve-worker", daemon=True)
            self._thread.start()
        return warmed

    def drain(self) -> None:
        """Take no new work; what is queued or running still completes."""
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (True), or ``timeout`` passes (False)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._batch_started is not None:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking work; queued jobs fail with ShuttingDown, the running batch finishes."""
        with self._cond:
            self._accepting = False
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

    def busy_seconds(self) -> float:
        """How long the running batch has been running (0 when idle): the stuck-worker watchdog."""
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    # -- submitting ------------------------------------------------------------------------
    def submit(self, requests: Sequence[GenerationRequest], request_id: str, deadline: float | None = None) -> list[Job]:
        """Enqueue all of ``requests`` or none (QueueFull / ShuttingDown)."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._pending) + len(requests) > self.settings.max_queue:
                metrics.FAILURES.labels(reason="queue_full").inc()
                raise QueueFull(self.settings.max_queue, self.settings.retry_after_s)
            jobs = [Job(r, request_id, deadline) for r in requests]
            self._pending.extend(jobs)
            metrics.QUEUE_DEPTH.set(len(self._pending))
            self._cond.notify_all()
        return jobs

    async def generate(
        self, requests: Sequence[GenerationRequest], request_id: str, timeout: float | None = None
    ) -> list[GenerationResult]:
        """Submit and await results without blocking the event loop. A timeout, or cancellation of
        the awaiting task (client gone), abandons the jobs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        jobs = self.submit(requests, request_id, deadline)
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
        except TimeoutError:
            metrics.FAILURES.labels(reason="deadline").inc()
            for job in jobs:
                job.abandon()
            raise jobs[0].deadline_error() from None
        except BaseException:
            for job in jobs:
                job.abandon()
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
            deadline = time.monotonic() + s.max_wait_ms / 1000
            while images < s.max_batch_images:
                for job in list(self._pending):
                    n = job.request.num_images
                    if images + n <= s.max_batch_images and job.request.batch_key() == key:
                        self._pending.remove(job)
                        batch.append(job)
                        images += n
                remaining = deadline - time.monotonic()
                if images >= s.max_batch_images or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            metrics.QUEUE_DEPTH.set(len(self._pending))
            self._batch_started = time.monotonic()
        runnable = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller cancelled while it was queued
            if job.gone():
                job.future.set_exception(job.deadline_error())
                continue
            runnable.append(job)
        return runnable

    def _work(self, first: Callable[[], None] | None, warmed: Future) -> None:
        try:
            if first is not None:
                first()
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for the warm-up
            warmed.set_exception(exc)
            return
        warmed.set_result(None)
        while not self._stopping:
            batch = self._next_batch()
            try:
                if batch:
                    self._run(batch)
            finally:
                with self._cond:
                    self._batch_started = None
                    self._cond.notify_all()

    def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        try:
            images = self._batch_fn([job.request for job in batch], lambda: all(job.gone() for job in batch))
        except Interrupted:
            log.info("stopped a batch early: its %d request(s) were cancelled or timed out", len(batch))
            for job in batch:
                metrics.FAILURES.labels(reason="interrupted").inc()
                job.future.set_exception(job.deadline_error())
            return
        except ImageTooLarge as exc:  # same size for the whole batch: all fail alike
            for job in batch:
                self._fail(job, exc, "out_of_memory")
            return
        except Exception as exc:  # noqa: BLE001 - any failure must reach the callers, not kill the worker
            if len(batch) > 1:
                # Rerun one by one so a request that breaks the pipeline fails alone.
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(batch), exc)
                for job in batch:
                    self._run([job])
                return
            self._fail(batch[0], GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"), "generation_error", exc)
            return
        self._complete(batch, images, started)

    def _complete(self, batch: list[Job], images: list, started: float) -> None:
        elapsed = time.monotonic() - started
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

    def _fail(self, job: Job, error: Exception, reason: str, cause: Exception | None = None) -> None:
        log.error("request %s failed: %s", job.request_id, error, exc_info=cause)
        metrics.FAILURES.labels(reason=reason).inc()
        job.future.set_exception(error)
