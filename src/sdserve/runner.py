"""Runs a batch of compatible requests through the pipelines. Called on the GPU worker thread only.

Each image gets its own ``torch.Generator`` seeded with its own seed, so an image is the same
whether it was generated alone or inside a batch (up to floating-point noise of batched kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model_store import LoadedModel
from .request import GenerationRequest, RefinerMode
from .schedulers import build_scheduler


@dataclass(frozen=True)
class _Image:
    """One image to make: the request it belongs to and its own prompts and seed."""

    owner: int
    prompt: str
    prompt_2: str | None
    negative_prompt: str | None
    negative_prompt_2: str | None
    seed: int


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline float output in [0, 1] (N, H, W, 3) to uint8, rounding as diffusers does."""
    images = np.nan_to_num(images, nan=0.0)
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


class PipelineRunner:
    """Turns a list of requests sharing one batch key into images, at most ``max_batch_images``
    per pipeline call."""

    def __init__(self, model: LoadedModel, max_batch_images: int):
        self.model = model
        self.max_batch_images = max_batch_images

    def run(self, requests: Sequence[GenerationRequest]) -> list[list[np.ndarray]]:
        """Images for each request, in request order."""
        items = [
            _Image(i, r.prompt, r.prompt_2, r.negative_prompt, r.negative_prompt_2, seed)
            for i, r in enumerate(requests)
            for seed in r.seeds
        ]
        out: list[list[np.ndarray]] = [[] for _ in requests]
        for start in range(0, len(items), self.max_batch_images):
            chunk = items[start : start + self.max_batch_images]
            for item, image in zip(chunk, self._generate(requests[0], chunk)):
                out[item.owner].append(image)
        return out

    @torch.inference_mode()
    def _generate(self, settings: GenerationRequest, items: Sequence[_Image]) -> np.ndarray:
        model = self.model
        seeds = [it.seed for it in items]
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        kwargs = {
            "prompt": [it.prompt for it in items],
            "negative_prompt": None
            if settings.negative_prompt is None
            else [it.negative_prompt or "" for it in items],
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "generator": generators,
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

