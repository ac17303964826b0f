"""The engine: the bounded queue, and the one worker thread that owns the model and runs the step
loop. Protocol adapters call :meth:`Engine.generate` from the event loop; it submits and awaits
without blocking the loop. Health, readiness and metrics never wait for the worker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

from .. import metrics
from ..errors import GenerationFailed, ShuttingDown
from ..request.types import GenerationRequest, GenerationResult
from .admission import AdmissionQueue, Job, Progress
from .backend import ModelBackend
from .loop import StepLoop

log = logging.getLogger("sdserve")

# What to generate at start-up before serving: (what it warms, for the log; the requests, admitted together).
Warmup = Callable[[], list[tuple[str, list[GenerationRequest]]]]


@dataclass(frozen=True)
class EngineSettings:
    max_batch_images: int = 4  # most images in one denoiser call: the memory bound
    max_active_images: int | None = None  # most images admitted at once; None: 4 x max_batch_images
    max_wait_ms: float = 0.0  # an idle worker waits this long for more requests before its first step
    max_queue: int = 32  # requests waiting for admission; beyond it, 503
    retry_after_s: int = 5

    def __post_init__(self) -> None:
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be at least 1, got {self.max_batch_images}")
        if self.max_active_images is not None and self.max_active_images < 1:
            raise ValueError(f"max_active_images must be at least 1, got {self.max_active_images}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")

    @property
    def active_limit(self) -> int:
        return self.max_active_images or 4 * self.max_batch_images


class Engine:
    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.queue = AdmissionQueue(settings.max_queue, settings.retry_after_s)
        metrics.IMAGE_CAPACITY.set(settings.max_batch_images)
        self.loop: StepLoop | None = None
        self._busy_since: float | None = None  # when the current iteration began; None when idle
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, prepare: Callable[[], ModelBackend], warmup: Warmup | None = None) -> Future:
        """Start the worker: it runs ``prepare`` (load the model: the thread that generates must
        own it from the first tensor), then the warm-up, then serves. The returned future tells
        when it is ready (or why it could not start)."""
        ready: Future = Future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, args=(prepare, warmup, ready), name="sdserve-worker",
                                            daemon=True)
            self._thread.start()
        return ready

    def drain(self) -> None:
        """Take no new work; what is queued or running still completes."""
        with self.queue.cond:
            self.queue.accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (True), or ``timeout`` passes (False)."""
        end = time.monotonic() + timeout
        with self.queue.cond:
            while len(self.queue) or self.active_images or self._busy_since is not None:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self.queue.cond.wait(min(remaining, 0.5))
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Stop: queued requests fail with ShuttingDown, running ones after the current step."""
        with self.queue.cond:
            self.queue.accepting = False
            self.queue.stopping = True
            dropped = self.queue.drop_all()
            self.queue.cond.notify_all()
        for job in dropped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown())
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.queue.stopping

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def active_images(self) -> int:
        return len(self.loop.active) if self.loop is not None else 0

    def busy_seconds(self) -> float:
        """How long the current iteration (one step, admission or decode) has taken: the
        stuck-worker watchdog's measure. 0 when idle."""
        started = self._busy_since
        return 0.0 if started is None else time.monotonic() - started

    # -- submitting --------------------------------------------------------------------------
    def submit(self, requests: Sequence[GenerationRequest], request_id: str, deadline: float | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> list[Job]:
        """Enqueue all of ``requests`` or none (QueueFull / ShuttingDown)."""
        jobs = [Job(r, request_id, deadline, on_progress) for r in requests]
        self.queue.submit(jobs)
        return jobs

    def queue_position(self, job: Job) -> int | None:
        return self.queue.position(job)

    async def generate(self, requests: Sequence[GenerationRequest], request_id: str, timeout: float | None = None,
                       on_progress: Callable[[Progress], None] | None = None) -> list[GenerationResult]:
        """Submit and await results without blocking the event loop. A timeout, or cancellation of
        the awaiting task (client gone), abandons the jobs: they stop at the next step."""
        deadline = None if timeout is None else time.monotonic() + timeout
        jobs = self.submit(requests, request_id, deadline, on_progress)
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

    # -- the worker --------------------------------------------------------------------------
    def _work(self, prepare: Callable[[], ModelBackend], warmup: Warmup | None, ready: Future) -> None:
        try:
            backend = prepare()
            self.loop = StepLoop(backend, self.settings.max_batch_images)
            for what, requests in warmup() if warmup else []:
                started = time.perf_counter()
                jobs = [Job(r, "warm-up") for r in requests]
                self.loop.run_to_completion(jobs)
                for job in jobs:
                    job.future.result(0)  # a failing warm-up fails the start-up
                log.info("warmed up %s in %.1f s", what, time.perf_counter() - started)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for readiness
            ready.set_exception(exc)
            return
        ready.set_result(None)
        self._serve()

    def _serve(self) -> None:
        s, loop, queue = self.settings, self.loop, self.queue
        while True:
            with queue.cond:
                while not len(queue) and not loop.active and not queue.stopping:
                    self._busy_since = None
                    queue.cond.notify_all()  # wake wait_idle
                    queue.cond.wait()
                if queue.stopping:
                    break
                idle = not loop.active
                room = s.active_limit - len(loop.active)
                jobs = queue.take(room, s.max_wait_ms / 1000 if idle else 0.0, idle, enough=s.max_batch_images)
                self._busy_since = time.monotonic()
            try:
                if jobs:
                    loop.admit(jobs)
                loop.step()
            except Exception as exc:  # noqa: BLE001 - a bug in the loop must not kill the worker
                log.exception("step loop failed; failing the requests in flight")
                loop.fail_all(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"), "generation_error")
        loop.fail_all(ShuttingDown(), "shutdown")
        self._busy_since = None
