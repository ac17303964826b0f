"""Runs a batch of compatible requests through the pipelines. Called on the GPU worker thread only.

Each image gets its own ``torch.Generator`` seeded with its own seed, so an image is the same
whether it was generated alone or inside a batch (up to floating-point noise of batched kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gc
import logging
from typing import Callable

import numpy as np
import torch

from . import metrics
from .adapters import Adapters
from .errors import ImageTooLarge, Interrupted
from .faults import Faults
from .model_store import LoadedModel
from .request import GenerationRequest, RefinerMode
from .schedulers import build_scheduler

log = logging.getLogger("sdserve")


@dataclass(frozen=True)
class _Image:
    """One image to make: the request it belongs to and its own prompts and seed."""

    owner: int
    request: GenerationRequest
    seed: int

    def negative(self, n: int) -> str:
        """Negative prompt for text encoder ``n`` (1-3): its own, else the first one, else ""."""
        r = self.request
        own = {1: r.negative_prompt, 2: r.negative_prompt_2, 3: r.negative_prompt_3}[n]
        return own or r.negative_prompt or ""


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline float output in [0, 1] (N, H, W, 3) to uint8, rounding as diffusers does."""
    images = np.nan_to_num(images, nan=0.0)
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


class PipelineRunner:
    """Turns a list of requests sharing one batch key into images, at most ``max_batch_images``
    per pipeline call."""

    def __init__(
        self, model: LoadedModel, max_batch_images: int, faults: Faults | None = None, adapters: Adapters | None = None
    ):
        self.model = model
        self.max_batch_images = max_batch_images
        self.faults = faults or Faults.from_env()
        self.adapters = adapters

    def run(
        self, requests: Sequence[GenerationRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> list[list[np.ndarray]]:
        """Images for each request, in request order. ``should_stop`` is polled between denoising
        steps; when it returns True the call raises Interrupted."""
        items = [_Image(i, r, seed) for i, r in enumerate(requests) for seed in r.seeds]
        if self.adapters is not None:
            self.adapters.activate(self.model.base, requests[0].loras)
        out: list[list[np.ndarray]] = [[] for _ in requests]
        for start in range(0, len(items), self.max_batch_images):
            chunk = items[start : start + self.max_batch_images]
            for item, image in zip(chunk, self._generate_fitting(requests[0], chunk, should_stop)):
                out[item.owner].append(image)
        return out

    def _generate_fitting(self, settings: GenerationRequest, items: Sequence[_Image], should_stop) -> list[np.ndarray]:
        """Generate ``items``; on out-of-memory retry in halves, down to one image."""
        try:
            return list(self._generate(settings, items, should_stop))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        _release_memory()
        if len(items) == 1:
            raise ImageTooLarge(
                f"out of accelerator memory generating one {settings.width}x{settings.height} image "
                f"(refiner: {settings.refiner}); ask for a smaller width/height"
            )
        metrics.OOM_RETRIES.inc()
        half = len(items) // 2
        log.warning("out of memory with %d images of %dx%d; retrying as %d + %d",
                    len(items), settings.width, settings.height, half, len(items) - half)
        return self._generate_fitting(settings, items[:half], should_stop) + self._generate_fitting(
            settings, items[half:], should_stop
        )

    @torch.inference_mode()
    def _generate(self, settings: GenerationRequest, items: Sequence[_Image], should_stop) -> np.ndarray:
        model = self.model
        self.faults.before_call(len(items), settings.width, settings.height)
        prompts = [it.request.prompt for it in items]

        def on_step(pipeline, step, timestep, tensors):
            self.faults.on_step(prompts, step)
            if should_stop():
                raise Interrupted()
            return {}

        seeds = [it.seed for it in items]
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        # The batch agrees on whether there is a negative prompt (batch key): None keeps SDXL's
        # zeroed negative embedding.
        has_negative = settings.negative_prompt is not None
        kwargs = {
            "prompt": prompts,
            "negative_prompt": [it.negative(1) for it in items] if has_negative else None,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "generator": generators,
            "callback_on_step_end": on_step,
        }
        family = model.capabilities.family
        if family in ("sdxl", "sd3"):
            kwargs["prompt_2"] = [it.request.prompt_2 or it.request.prompt for it in items]
            kwargs["negative_prompt_2"] = [it.negative(2) for it in items] if has_negative else None
        if family == "sd3":
            kwargs["prompt_3"] = [it.request.prompt_3 or it.request.prompt for it in items]
            kwargs["negative_prompt_3"] = [it.negative(3) for it in items] if has_negative else None
        if family == "sdxl":
            kwargs.update(
                original_size=settings.original_size,
                crops_coords_top_left=settings.crops_coords_top_left or (0, 0),
                target_size=settings.target_size,
            )
        base = model.base
        scheduler_family = model.capabilities.scheduler_family
        base.scheduler = build_scheduler(settings.scheduler, model.scheduler_config, seeds, scheduler_family)
        mode = settings.refiner if model.refiner is not None else RefinerMode.NONE
        if mode is RefinerMode.NONE:
            images = base(height=settings.height, width=settings.width, output_type="np", **kwargs).images
            return to_uint8(images)

        refiner = model.refiner
        refiner.scheduler = build_scheduler(settings.scheduler, model.refiner_scheduler_config, seeds)
        if mode is RefinerMode.ENSEMBLE:
            latents = base(
                height=settings.height,
                width=settings.width,
                denoising_end=settings.high_noise_frac,
                output_type="latent",
                **kwargs,
            ).images
            images = refiner(
                image=latents, denoising_start=settings.high_noise_frac, output_type="np", **kwargs
            ).images
        else:  # REFINE: the base finishes, the refiner re-runs the tail of the schedule
            latents = base(height=settings.height, width=settings.width, output_type="latent", **kwargs).images
            images = refiner(
                image=latents, strength=settings.refiner_strength, output_type="np", **kwargs
            ).images
        return to_uint8(images)

