"""The one place a request is validated.

Protocol adapters (v1, v2 REST/gRPC, OpenAI) turn their payloads into a plain mapping of generation
parameters and call :meth:`RequestParser.parse`, which returns a :class:`GenerationRequest`. Every
error names the offending field and the allowed values or range, and is raised as
``kserve.errors.InvalidInput`` (HTTP 400, gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

from kserve.errors import InvalidInput

from . import image_input
from .fields import AdapterCatalog, Fields
from .request import IMAGE_FORMATS, MAX_SEED, GenerationRequest, Limits, ModelCapabilities, RefinerMode
from .schedulers import min_steps

# Fields only some model families read; the others would silently ignore them, so they are refused.
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_2": ("sdxl", "sd3"),
    "negative_prompt_2": ("sdxl", "sd3"),
    "prompt_3": ("sd3",),
    "negative_prompt_3": ("sd3",),
    "original_size": ("sdxl",),
    "crops_coords_top_left": ("sdxl",),
    "target_size": ("sdxl",),
}


class NoAdapters:
    def exists(self, name: str) -> bool:
        return False

    def names(self) -> list[str]:
        return []


class RequestParser:
    """Turns a mapping of parameters into a :class:`GenerationRequest`, or raises InvalidInput."""

    def __init__(self, limits: Limits, model: ModelCapabilities, adapters: AdapterCatalog | None = None):
        self.limits = limits
        self.model = model
        self.adapters = adapters or NoAdapters()

    def check_total_images(self, requests: list[GenerationRequest], field: str) -> None:
        """One HTTP/gRPC request may carry several prompts; together they get --max_images."""
        total = sum(r.num_images for r in requests)
        if total > self.limits.max_images:
            raise InvalidInput(
                f"{field}: {total} images asked for in one request; the server limit is {self.limits.max_images}"
            )

    def check_fields(self, values: Mapping[str, Any], where: str = "") -> None:
        """Reject unknown field names in a partial set of parameters (e.g. shared defaults)."""
        Fields(values, where)

    def parse(self, values: Mapping[str, Any], where: str = "") -> GenerationRequest:
        """Validate ``values``; ``where`` prefixes field names in errors (e.g. ``instances[2].``)."""
        if not isinstance(values, Mapping):
            raise InvalidInput(f"{where or 'request'}: expected an object of generation parameters")
        v = Fields(values, where)
        lim, model = self.limits, self.model
        for name, families in FAMILY_FIELDS.items():
            if v.has(name) and model.family not in families:
                names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3"}
                raise InvalidInput(
                    f"{v.label(name)}: only {' and '.join(names[f] for f in families)} models accept this "
                    f"field; the loaded model is a {model.pipeline_class}"
                )
        if model.family == "sd3" and not model.has_t5:
            for name in ("prompt_3", "negative_prompt_3"):
                if v.has(name):
                    raise InvalidInput(f"{v.label(name)}: the T5 encoder is not loaded (--drop_t5), so it would have no effect")

        start = self._start_image(v)
        default_width, default_height = _default_size(model, lim, start.size if start else None)
        if start is not None and v.has("width") != v.has("height"):  # one side given: keep the aspect
            given = v.dimension("width" if v.has("width") else "height", 0, lim, model.size_multiple)
            ratio = start.size[1] / start.size[0] if v.has("width") else start.size[0] / start.size[1]
            other = max(model.size_multiple, int(given * ratio) // model.size_multiple * model.size_multiple)
            default_width, default_height = (given, other) if v.has("width") else (other, given)
        width = v.dimension("width", default_width, lim, model.size_multiple)
        height = v.dimension("height", default_height, lim, model.size_multiple)
        if width * height > lim.max_pixels:
            raise InvalidInput(
                f"{where}width x height: {width}x{height} = {width * height} pixels exceeds the "
                f"server limit of {lim.max_pixels} pixels"
            )
        steps = v.integer("num_inference_steps", min(model.default_steps, lim.max_steps), 1, lim.max_steps)
        mask = self._mask(v, start)
        refiner = v.refiner_mode(model.has_refiner, inpaint=mask is not None)
        strength = self._strength(v, start, mask, steps)
        high_noise_frac = v.number("high_noise_frac", 0.8, 0.0, 1.0, open_range=True)
        refiner_strength = v.number("refiner_strength", 0.3, 0.0, 1.0, open_low=True)
        if refiner is RefinerMode.REFINE and int(steps * refiner_strength) < 1:
            raise InvalidInput(
                f"{v.label('refiner_strength')}: {refiner_strength} of {steps} steps leaves the refiner no "
                f"step; raise refiner_strength or num_inference_steps"
            )
        scheduler = v.scheduler(model.scheduler_family)
        fewest = min_steps(scheduler, model.scheduler_class, model.scheduler_family)
        if steps < fewest:
            raise InvalidInput(
                f"{v.label('num_inference_steps')}: the {scheduler or model.scheduler_class} scheduler "
                f"needs at least {fewest} steps, got {steps}"
            )
        if refiner is RefinerMode.ENSEMBLE and steps < 2:
            raise InvalidInput(
                f"{v.label('num_inference_steps')}: the ensemble refiner mode needs at least 2 steps, got {steps}"
            )
        if refiner is RefinerMode.ENSEMBLE and strength is not None and strength <= 1 - high_noise_frac:
            raise InvalidInput(
                f"{v.label('strength')}: {strength} leaves the base model no step before the ensemble refiner takes "
                f"over at high_noise_frac {high_noise_frac}; give strength above {1 - high_noise_frac:.3g}, or "
                f"refiner: refine"
            )
        negative_prompt = v.text("negative_prompt", lim.max_prompt_length)
        negative_prompt_2 = v.text("negative_prompt_2", lim.max_prompt_length)
        negative_prompt_3 = v.text("negative_prompt_3", lim.max_prompt_length)
        if negative_prompt is None and (negative_prompt_2 is not None or negative_prompt_3 is not None):
            # diffusers ignores the other negative prompts when negative_prompt is absent; make them count.
            negative_prompt = ""
        seed = v.integer("seed", -1, -1, MAX_SEED)
        image_format = v.choice("format", "png", IMAGE_FORMATS)
        return GenerationRequest(
            prompt=v.text("prompt", lim.max_prompt_length, required=True),
            prompt_2=v.text("prompt_2", lim.max_prompt_length),
            prompt_3=v.text("prompt_3", lim.max_prompt_length),
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=v.number("guidance_scale", model.default_guidance_scale, 0.0, lim.max_guidance_scale),
            seed=secrets.randbits(63) if seed == -1 else seed,
            num_images=v.integer("num_images", 1, 1, lim.max_images),
            scheduler=scheduler,
            refiner=refiner,
            high_noise_frac=high_noise_frac,
            refiner_strength=refiner_strength,
            original_size=v.pair("original_size", 1, 16384),
            crops_coords_top_left=v.pair("crops_coords_top_left", 0, 16384),
            target_size=v.pair("target_size", 1, 16384),
            image_format=image_format,
            quality=v.integer("quality", 90, 1, 100),
            loras=v.loras(self.adapters),
            image=image_input.as_rgb(start, (width, height)) if start is not None else None,
            mask=image_input.as_mask(mask, (width, height)) if mask is not None else None,
            strength=strength,
        )

    def _start_image(self, v: Fields):
        """The decoded start image, or None; a model that needs one gets a 400 without it."""
        if not v.has("image"):
            if self.model.needs_image or self.model.needs_mask:
                what = "an inpainting model: give image and mask" if self.model.needs_mask else \
                    "an image-to-image model (an SDXL refiner alone): give image"
                raise InvalidInput(f"{v.label('image')}: required: the loaded model is {what}")
            return None
        value = v.values["image"]
        label = v.label("image")
        if isinstance(value, list):  # AUTOMATIC1111's init_images: a list of one
            if len(value) != 1:
                raise InvalidInput(f"{label}: give exactly one image, got {len(value)}")
            value, label = value[0], f"{label}[0]"
        image = image_input.decode_image(value, label, self.limits.max_input_pixels)
        smallest = self.limits.min_side
        if min(image.size) < smallest:
            raise InvalidInput(f"{label}: {image.size[0]}x{image.size[1]} is smaller than the server minimum "
                               f"of {smallest} pixels a side")
        return image

    def _mask(self, v: Fields, start):
        if not v.has("mask"):
            if self.model.needs_mask and start is not None:
                raise InvalidInput(f"{v.label('mask')}: required: the loaded model is an inpainting model")
            return None
        if start is None:
            raise InvalidInput(f"{v.label('mask')}: a mask needs an image to repaint; give image as well")
        if self.model.needs_image:
            raise InvalidInput(f"{v.label('mask')}: the loaded model (an SDXL refiner alone) does not inpaint")
        mask = image_input.decode_image(v.values["mask"], v.label("mask"), self.limits.max_input_pixels)
        if mask.size != start.size:
            raise InvalidInput(f"{v.label('mask')}: {mask.size[0]}x{mask.size[1]} differs from the image's size "
                               f"{start.size[0]}x{start.size[1]}; they must match")
        return mask

    def _strength(self, v: Fields, start, mask, steps: int) -> float | None:
        if start is None:
            if v.has("strength"):
                raise InvalidInput(f"{v.label('strength')}: applies to a start image; give image as well")
            return None
        strength = v.number("strength", 1.0 if mask is not None else 0.8, 0.0, 1.0, open_low=True)
        # the pipelines' get_timesteps: SD3's keeps the fraction where the others truncate first
        left = steps - int(steps - steps * strength) if self.model.family == "sd3" else int(steps * strength)
        if left < 1:
            raise InvalidInput(
                f"{v.label('strength')}: {strength} of {steps} steps leaves no denoising step; raise strength "
                f"or num_inference_steps"
            )
        return strength


def _default_size(model: ModelCapabilities, limits: Limits, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The start image's size, else the model's own; shrunk (keeping its aspect) when the server's
    limits are tighter, and rounded down to the model's size multiple."""
    width, height = image_size or (model.default_width, model.default_height)
    scale = min(1.0, limits.max_side / max(width, height), math.sqrt(limits.max_pixels / (width * height)))
    m = model.size_multiple
    return max(m, int(width * scale) // m * m), max(m, int(height * scale) // m * m)
