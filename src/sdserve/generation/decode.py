"""Finished images: the last phase's VAE decode, batched over the images that finish together,
then the pipeline's own post-processing and rounding to 8 bits."""

from __future__ import annotations

import numpy as np
import torch

from .policy import padded
from .state import ImageState


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline float output in [0, 1] (N, H, W, 3) to uint8, rounding as diffusers does."""
    images = np.nan_to_num(images, nan=0.0)
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def decode(images: list[ImageState], largest: int, pad: bool = False) -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays for ``images``, which share their last phase and size. With ``pad``
    (a compiled VAE) the batch is padded to a bucket size, as denoiser calls are."""
    phase = images[0].schedule.phase
    latents = [image.latents for image in images]
    size = padded(len(latents), largest) if pad else len(latents)
    latents += [latents[-1]] * (size - len(latents))
    decoded = phase.decode(torch.cat(latents) if size > 1 else latents[0])[: len(images)]
    return list(to_uint8(phase.postprocess(decoded)))
