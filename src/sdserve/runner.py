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
    prompt: str
    prompt_2: str | None
    negative_prompt: str | None
    negative_prompt_2: str | None
    seed: int


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

    def __init__(self, model: LoadedModel, max_batch_images: int, faults: Faults | None = None):
        self.model = model
        self.max_batch_images = max_batch_images
        self.faults = faults or Faults.from_env()

    def run(
        self, requests: Sequence[GenerationRequest], should_stop: Callable[[], bool] = lambda: False
    ) -> list[list[np.ndarray]]:
        """Images for each request, in request order. ``should_stop`` is polled between denoising
        steps; when it returns True the call raises Interrupted."""
        items = [
            _Image(i, r.prompt, r.prompt_2, r.negative_prompt, r.negative_prompt_2, seed)
            for i, r in enumerate(requests)
            for seed in r.seeds
        ]
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
        prompts = [it.prompt for it in items]

        def on_step(pipeline, step, timestep, tensors):
            self.faults.on_step(prompts, step)
            if should_stop():
                raise Interrupted()
            return {}

        seeds = [it.seed for it in items]
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs = {
            "prompt": prompts,
            "negative_prompt": None
            if settings.negative_prompt is None
            else [it.negative_prompt or "" for it in items],
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "generator": generators,
            "callback_on_step_end": on_step,
        }
        if model.capabilities.is_sdxl:
            kwargs.update(
                prompt_2=[it.prompt_2 or it.prompt for it in items],
                negative_prompt_2=None
                if settings.negative_prompt is None
                else [it.negative_prompt_2 or it.negative_prompt or "" for it in items],
                original_size=settings.original_size,
                crops_coords_top_left=settings.crops_coords_top_left or (0, 0),
                target_size=settings.target_size,
            )
        base = model.base
        base.scheduler = build_scheduler(settings.scheduler, model.scheduler_config, seeds)
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

