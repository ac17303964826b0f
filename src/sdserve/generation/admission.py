"""Admission: the bounded queue in front of the step loop, and the job each request becomes.

Protocol adapters submit from the event loop; the worker takes jobs from the queue (oldest first)
at a step boundary, when there is room for their images among the active ones. A job is *gone*
when its caller stopped waiting (client disconnected, request cancelled) or its deadline passed:
a gone job is never admitted, and an admitted one leaves the loop at the next step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .. import metrics
from ..errors import DeadlineExceeded, QueueFull, ShuttingDown
from ..request.types import GenerationRequest


@dataclass(frozen=True)
class Progress:
    """One image's progress, handed to a job's progress hook after each of its denoising steps
    (on the worker thread: a hook must be quick and must not keep the tensors)."""

    request_id: str
    image_index: int
    step: int  # denoiser calls done for this image, all phases together
    steps: int  # denoiser calls it needs in all
    phase: str  # "base" or "refiner"
    latents: object  # torch.Tensor (1, C, h, w): the current noisy latents
    denoised: object | None  # the scheduler's prediction of the clean latents, when it gives one


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    request_id: str
    deadline: float | None = None  # time.monotonic() after which nobody wants the result
    on_progress: Callable[[Progress], None] | None = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_step_at: float | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)
    images: list = field(default_factory=list)  # uint8 arrays as they are decoded, by image index
    most_images_per_call: int = 0
    rows_saved: dict[str, int] = field(default_factory=lambda: {"guidance_interval": 0, "cache": 0})
    cache_logs: list = field(default_factory=list)  # per image with a feature cache: what ran at each call

    def abandon(self) -> None:
        """The caller stopped waiting: drop the job if queued, stop its images if running."""
        self.abandoned.set()
        self.future.cancel()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def gone(self) -> bool:
        return self.abandoned.is_set() or self.expired()

    def deadline_error(self) -> DeadlineExceeded:
        waited = time.monotonic() - self.enqueued_at
        return DeadlineExceeded(f"request deadline passed after {waited:.1f} s; the generation was stopped")


def _count_pending(job: Job) -> None:
    """Count the job's images in ``sdserve_images_pending`` until its future is done. Every way a
    job ends (result, error, cancellation while queued, shutdown) completes its future exactly once,
    so the gauge returns to 0 without each of those paths having to remember it."""
    n = job.request.num_images
    metrics.IMAGES_PENDING.inc(n)
    job.future.add_done_callback(lambda _: metrics.IMAGES_PENDING.dec(n))


class AdmissionQueue:
    """Jobs waiting for the worker, bounded by ``max_queue`` requests; thread-safe."""

    def __init__(self, max_queue: int, retry_after_s: int):
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.accepting = True
        self.stopping = False

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, jobs: list[Job]) -> None:
        """Enqueue all of ``jobs`` or none (QueueFull / ShuttingDown)."""
        with self.cond:
            if not self.accepting:
                raise ShuttingDown()
            if len(self._pending) + len(jobs) > self.max_queue:
                metrics.FAILURES.labels(reason="queue_full").inc()
                raise QueueFull(self.max_queue, self.retry_after_s)
            self._pending.extend(jobs)
            metrics.QUEUE_DEPTH.set(len(self._pending))
            for job in jobs:
                _count_pending(job)
            self.cond.notify_all()

    def position(self, job: Job) -> int | None:
        """0 for the next job to be admitted; None once it has left the queue."""
        with self.cond:
            for i, pending in enumerate(self._pending):
                if pending is job:
                    return i
        return None

    def take(self, room: int, wait_s: float = 0.0, idle: bool = False, enough: int = 1) -> list[Job]:
        """Jobs in arrival order whose images fit in ``room`` (the first always does when the loop
        is ``idle``). Waits up to ``wait_s`` for more while fewer than ``enough`` images are taken.
        Jobs whose caller is gone are failed here, never handed out. Call with ``cond`` held."""
        taken: list[Job] = []
        images = 0
        deadline = time.monotonic() + wait_s
        while True:
            while self._pending:
                job = self._pending[0]
                n = job.request.num_images
                if images + n > room and not (idle and not taken):
                    break
                self._pending.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue  # its caller cancelled while it was queued
                if job.gone():
                    job.future.set_exception(job.deadline_error())
                    continue
                taken.append(job)
                images += n
            remaining = deadline - time.monotonic()
            if self._pending or images >= min(enough, room) or remaining <= 0 or self.stopping:
                break
            self.cond.wait(remaining)
        metrics.QUEUE_DEPTH.set(len(self._pending))
        return taken

    def drop_all(self) -> list[Job]:
        """Empty the queue (at shutdown); returns what was waiting. Call with ``cond`` held."""
        dropped = list(self._pending)
        self._pending.clear()
        metrics.QUEUE_DEPTH.set(0)
        return dropped
