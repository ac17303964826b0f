"""Requests that start from an image: image-to-image and inpainting, as diffusers' img2img and
inpaint pipelines do them, one image at a time inside the shared step loop.

The start image (and the masked image) is VAE-encoded once per request; each image then samples
its latents from that encoding with its own generator, draws its noise and is noised to the first
timestep ``strength`` leaves (``Phase.plan`` cuts the schedule). The generator is drawn from in the
pipelines' order (image latents, noise, masked-image latents), so every image equals the pipeline's
for its seed. Inpainting then keeps the unmasked region: a 4-channel denoiser gets the noised
original blended back after every step; an inpainting denoiser (9 channels) reads the mask and the
masked image's latents as extra input channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..request.types import GenerationRequest
from .state import ImageState, Inpaint

if TYPE_CHECKING:
    from .families.common import Phase


@dataclass(eq=False)
class EncodedStart:
    """One request's start, encoded once for all its images."""

    image: Any  # the VAE's latent distribution of the start image
    mask: torch.Tensor | None = None  # at latent size: 1 = repaint
    masked_image: Any = None  # the latent distribution of the image with the masked region blanked


def encode_start(phase: "Phase", request: GenerationRequest, dtype: torch.dtype) -> EncodedStart:
    height, width = request.height, request.width
    pixels = phase.pipe.image_processor.preprocess(request.image, height=height, width=width)
    if request.mask is None:
        return EncodedStart(phase.encode_pixels(pixels, dtype))
    mask = phase.masks.preprocess(request.mask, height=height, width=width)
    latent_mask = phase.latent_mask(mask)
    # A 4-channel denoiser never reads the masked image: its sample is only drawn, not encoded.
    masked = phase.encode_pixels(pixels * (mask < 0.5), dtype) if phase.mask_channels else None
    return EncodedStart(phase.encode_pixels(pixels, dtype), latent_mask.to(phase.device, dtype), masked)


def _skip_sample(distribution, generator: torch.Generator) -> None:
    """Advance ``generator`` exactly as sampling ``distribution`` would."""
    p = distribution.parameters
    randn_tensor(distribution.mean.shape, generator=generator, device=p.device, dtype=p.dtype)


def begin_from_image(phase: "Phase", image: ImageState, start: EncodedStart, dtype: torch.dtype) -> torch.Tensor:
    """The first latents of one image of an image-input request (``image.inpaint`` set too)."""
    request, schedule, generator = image.job.request, image.schedule, image.generator
    inpaint = request.mask is not None
    from_noise = inpaint and request.strength == 1.0  # inpainting at full strength starts from noise
    image_latents = None
    if not (from_noise and phase.mask_channels and phase.skips_start_at_full_strength):
        image_latents = phase.scale_latents(start.image.sample(generator).to(dtype))
    noise = phase.noise(image, dtype)
    if from_noise:
        latents = noise * phase.init_noise_sigma(schedule.scheduler)
    else:
        latents = phase.add_noise(schedule.scheduler, image_latents, noise, schedule.timesteps[:1])
    if inpaint:
        if phase.mask_channels:
            masked = phase.scale_latents(start.masked_image.sample(generator).to(dtype))
            image.inpaint = Inpaint(start.mask, masked_latents=masked)
        else:
            _skip_sample(start.image, generator)  # the pipelines encode the masked image here
            image.inpaint = Inpaint(start.mask, image_latents=image_latents, noise=noise)
    return latents


def denoiser_input(image: ImageState, latents: torch.Tensor) -> torch.Tensor:
    """An inpainting denoiser's input: the scaled latents, the mask and the masked image's latents."""
    inpaint = image.inpaint
    if inpaint is None or inpaint.masked_latents is None:
        return latents
    return torch.cat([latents, inpaint.mask, inpaint.masked_latents], dim=1)


def keep_unmasked(image: ImageState) -> None:
    """After a step of a 4-channel denoiser: the unmasked region is the original, noised to the
    next timestep (not noised after the last step)."""
    inpaint, s = image.inpaint, image.schedule
    if inpaint is None or inpaint.image_latents is None:
        return
    original = inpaint.image_latents
    if image.step < len(s.times):
        original = s.phase.add_noise(s.scheduler, original, inpaint.noise, s.timesteps[image.step : image.step + 1])
    image.latents = (1 - inpaint.mask) * original + inpaint.mask * image.latents
