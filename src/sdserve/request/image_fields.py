"""The start image and the mask of an image-input request (img2img, inpainting): decoded, and
checked against each other and the loaded model."""

from __future__ import annotations

from typing import Any

from kserve.errors import InvalidInput

from ..models.capabilities import ModelCapabilities
from . import image_input
from .types import Limits


def start_image(v: Any, model: ModelCapabilities, limits: Limits):
    """The decoded start image, or None; a model that needs one gets a 400 without it."""
    if not v.has("image"):
        if model.needs_image or model.needs_mask:
            what = "an inpainting model: give image and mask" if model.needs_mask else \
                "an image-to-image model (an SDXL refiner alone): give image"
            raise InvalidInput(f"{v.label('image')}: required: the loaded model is {what}")
        return None
    value = v.image
    label = v.label("image")
    if isinstance(value, list):  # AUTOMATIC1111's init_images: a list of one
        if len(value) != 1:
            raise InvalidInput(f"{label}: give exactly one image, got {len(value)}")
        value, label = value[0], f"{label}[0]"
    image = image_input.decode_image(value, label, limits.max_input_pixels)
    smallest = limits.min_side
    if min(image.size) < smallest:
        raise InvalidInput(f"{label}: {image.size[0]}x{image.size[1]} is smaller than the server minimum "
                           f"of {smallest} pixels a side")
    return image


def mask_image(v: Any, model: ModelCapabilities, limits: Limits, start):
    """The decoded mask, or None; it needs a start image of its size."""
    if not v.has("mask"):
        if model.needs_mask and start is not None:
            raise InvalidInput(f"{v.label('mask')}: required: the loaded model is an inpainting model")
        return None
    if start is None:
        raise InvalidInput(f"{v.label('mask')}: a mask needs an image to repaint; give image as well")
    if model.needs_image:
        raise InvalidInput(f"{v.label('mask')}: the loaded model (an SDXL refiner alone) does not inpaint")
    mask = image_input.decode_image(v.mask, v.label("mask"), limits.max_input_pixels)
    if mask.size != start.size:
        raise InvalidInput(f"{v.label('mask')}: {mask.size[0]}x{mask.size[1]} differs from the image's size "
                           f"{start.size[0]}x{start.size[1]}; they must match")
    return mask
