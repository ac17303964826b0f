"""The step loop: the worker's state between denoising steps, and one iteration of it.

Each iteration the policy picks one group of active images; they go through one denoiser call
together, each takes its own scheduler step, moves on to its next phase (base to refiner) or, when
done, is decoded with the images that finished with it. A request is answered as soon as its last
image is decoded. Requests whose caller is gone leave at the next step.

Failures stay with their requests: a call that runs out of memory is retried with half the images
(a lone image that does not fit fails its request with 507), and a call that fails otherwise is
retried per request, so that only the request that breaks it fails.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Callable

import torch

from .. import metrics
from ..errors import GenerationFailed, ImageTooLarge
from ..request.types import GenerationResult
from .admission import Job, Progress
from .backend import ModelBackend
from .decode import decode
from .denoise import Denoise
from .policy import StepPolicy
from .state import ImageState

log = logging.getLogger("sdserve")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _job(item: Job | ImageState) -> Job:
    return item if isinstance(item, Job) else item.job


def _jobs(items: list) -> list[Job]:
    """The distinct jobs of ``items`` (jobs or images), in order."""
    return list({id(_job(x)): _job(x) for x in items}.values())


class StepLoop:
    """Owned by the worker thread."""

    def __init__(self, backend: ModelBackend, max_batch_images: int):
        self.backend = backend
        self.max_images = max_batch_images
        self.policy = StepPolicy(max_batch_images)
        self.denoise = Denoise(max_rows=2 * max_batch_images, pad_rows=backend.pad_rows,
                               adapter_scope=backend.adapter_scope, controls=backend.control_scope)
        self.active: list[ImageState] = []

    # -- admission -------------------------------------------------------------------------
    def admit(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            job.admitted_at = now
            metrics.QUEUE_SECONDS.observe(now - job.enqueued_at)
        self._isolated(jobs, self._admit)

    @torch.inference_mode()
    def _admit(self, jobs: list[Job]) -> None:
        in_use = frozenset(name for im in self.active for name, _ in im.job.request.loras)
        images = self.backend.admit(jobs, in_use)
        self.active += images
        metrics.ACTIVE_IMAGES.set(len(self.active))
        self._advance([im for im in images if im.phase_done])  # a phase may have no step at all

    # -- one iteration -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """One denoiser call for the next group; False when nothing is active."""
        self._drop_gone()
        images = self.policy.choose(self.active)
        if not images:
            return False
        firsts = [im.job.request.prompt for im in images if im.steps_done == 0]
        if firsts:
            self.backend.faults.on_first_step(firsts)
        self._denoise(images)
        self._advance([im for im in images if not im.job.future.done()], stepped=len(images))
        return True

    def _denoise(self, images: list[ImageState]) -> None:
        images = [im for im in images if not im.job.future.done()]  # a request failed meanwhile
        if not images:
            return
        request = images[0].job.request
        rows = sum(im.rows for im in images)  # before the step: after it, guidance may differ
        try:
            self.backend.faults.before_call(len(images), request.width, request.height)
            failures = self.denoise(images)
        except Exception as exc:  # noqa: BLE001 - stays with the requests in the call
            if is_out_of_memory(exc):
                self.policy.ran_out_of_memory(images[0].group_key(), len(images) // 2)
                self._halves(images, self._denoise, "generating")
            else:
                self._per_request(images, self._denoise, exc)
            return
        for image, exc in failures:
            self._broke(image.job, exc)
        phase = images[0].schedule.phase.name
        metrics.DENOISER_CALLS.labels(phase=phase).inc()
        metrics.BATCH_IMAGES.observe(len(images))
        metrics.ROWS_PER_CALL.observe(rows)
        if images[0].schedule.phase.uses_adapters:
            metrics.ADAPTER_SETS_PER_CALL.observe(len({im.job.request.loras for im in images}))

    def _advance(self, images: list[ImageState], stepped: int = 0) -> None:
        """After a step: report progress, start the next phase, decode the finished."""
        now = time.monotonic()
        finished = []
        for image in images:
            job = image.job
            if stepped:
                if job.first_step_at is None:
                    job.first_step_at = now
                    metrics.FIRST_STEP_SECONDS.observe(now - job.enqueued_at)
                job.most_images_per_call = max(job.most_images_per_call, stepped)
                self._report(image)
            try:
                while image.phase_done and len(image.schedules) > 1:
                    image.schedules.pop(0)
                    image.step = 0
                    image.latents = image.schedule.phase.begin(image, image.latents)
            except Exception as exc:  # noqa: BLE001
                self._broke(job, exc)
                continue
            if image.phase_done:
                finished.append(image)
        groups: dict[tuple, list[ImageState]] = {}
        for image in finished:
            groups.setdefault((image.schedule.phase.name, tuple(image.latents.shape)), []).append(image)
        for group in groups.values():
            for start in range(0, len(group), self.max_images):  # the same memory bound as a call
                self._isolated(group[start : start + self.max_images], self._decode)

    def _decode(self, images: list[ImageState]) -> None:
        images = [im for im in images if not im.job.future.done() and im.job.images[im.index] is None]
        if not images:
            return
        try:
            arrays = decode(images, self.max_images, pad=self.backend.pad_decode)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            self._halves(images, self._decode, "decoding")
            return
        for image, array in zip(images, arrays):
            image.job.images[image.index] = array
            self.active.remove(image)
        self._left()
        for job in _jobs(images):
            if all(a is not None for a in job.images):
                self._complete(job)

    def _report(self, image: ImageState) -> None:
        hook = image.job.on_progress
        if hook is None:
            return
        try:
            hook(Progress(image.job.request_id, image.index, image.steps_done, image.total_steps,
                          image.schedule.phase.name, image.latents, image.denoised))
        except Exception:  # noqa: BLE001 - a broken hook must not stop the loop
            log.exception("request %s: progress hook failed", image.job.request_id)

    # -- outcomes -----------------------------------------------------------------------------
    def _complete(self, job: Job) -> None:
        now = time.monotonic()
        metrics.IMAGES.inc(len(job.images))
        if job.request.image is not None:
            metrics.IMAGE_INPUT_IMAGES.labels(mode=job.request.describe()["mode"]).inc(len(job.images))
        metrics.GENERATION_SECONDS.observe(now - job.admitted_at)
        job.future.set_result(GenerationResult(
            images=job.images, seeds=job.request.seeds, queue_seconds=job.admitted_at - job.enqueued_at,
            generate_seconds=now - job.admitted_at, batch_images=job.most_images_per_call,
            rows_saved=dict(job.rows_saved) if job.request.cache != "none"
            or job.request.guidance_interval != (0.0, 1.0) else None,
        ))

    def _fail(self, job: Job, error: Exception, reason: str, cause: Exception | None = None) -> None:
        if reason == "shutdown":
            log.info("request %s: %s", job.request_id, error)
        elif reason != "interrupted":
            log.error("request %s failed: %s", job.request_id, error, exc_info=cause)
        metrics.FAILURES.labels(reason=reason).inc()
        if not job.future.done():
            job.future.set_exception(error)
        self.active = [im for im in self.active if im.job is not job]
        self._left()

    def _left(self) -> None:
        """Images left the loop: drop the cached conditioning of groups that are gone."""
        metrics.ACTIVE_IMAGES.set(len(self.active))
        self.denoise.forget({im.group_key() for im in self.active})

    def fail_all(self, error: Exception, reason: str) -> None:
        for job in _jobs(self.active):
            self._fail(job, error, reason)

    def _drop_gone(self) -> None:
        for job in _jobs(self.active):
            if job.gone():
                done = min(im.steps_done for im in self.active if im.job is job)
                total = max(im.total_steps for im in self.active if im.job is job)
                log.info("request %s stopped at step %d of %d: its caller is gone or its deadline passed",
                         job.request_id, done, total)
                self._fail(job, job.deadline_error(), "interrupted")

    def _halves(self, images: list[ImageState], run: Callable, what: str) -> None:
        release_memory()
        request = images[0].job.request
        if len(images) == 1:
            self._fail(images[0].job, ImageTooLarge(
                f"out of accelerator memory {what} one {request.width}x{request.height} image "
                f"(refiner: {request.refiner}); ask for a smaller width/height"), "out_of_memory")
            return
        metrics.OOM_RETRIES.inc()
        half = len(images) // 2
        log.warning("out of memory %s %d images of %dx%d; retrying as %d + %d",
                    what, len(images), request.width, request.height, half, len(images) - half)
        run(images[:half])
        run(images[half:])

    def _per_request(self, items: list, run: Callable, exc: Exception) -> None:
        """A shared call failed: rerun it per request, so that only the request that breaks it
        fails. ``items`` are jobs or images."""
        jobs = _jobs(items)
        if len(jobs) == 1:
            self._broke(jobs[0], exc)
            return
        log.warning("a call for %d requests failed (%s); retrying them one by one", len(jobs), exc)
        for job in jobs:
            try:
                run([x for x in items if _job(x) is job])
            except Exception as own:  # noqa: BLE001
                self._broke(job, own)

    def _broke(self, job: Job, exc: Exception) -> None:
        self._fail(job, GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"), "generation_error", exc)

    def _isolated(self, items: list, run: Callable) -> None:
        try:
            run(items)
        except Exception as exc:  # noqa: BLE001 - stays with the requests involved
            self._per_request(items, run, exc)

    # -- warm-up ------------------------------------------------------------------------------
    def run_to_completion(self, jobs: list[Job]) -> None:
        """Admit ``jobs`` and step until they are done (start-up warm-up, on the worker thread)."""
        for job in jobs:
            job.future.set_running_or_notify_cancel()
        self.admit(jobs)
        while not all(job.future.done() for job in jobs) and self.step():
            pass
