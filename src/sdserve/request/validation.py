"""Where a request is validated: each field by the server's pydantic model (``parameters.py``),
then the rules between fields, and against the loaded model, here.

Protocol adapters (v1, v2 REST/gRPC, OpenAI) turn their payloads into a plain mapping of generation
parameters and call :meth:`RequestParser.parse`, which returns a :class:`GenerationRequest`. Every
error names the offending field and the allowed values or range, and is raised as
``kserve.errors.InvalidInput`` (HTTP 400, gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from kserve.errors import InvalidInput

from ..models.capabilities import ModelCapabilities
from ..models.schedulers import (
    default_eta,
    max_steps,
    min_steps,
    sampler_fields,
    samplers_taking,
)
from . import image_input, step_savings
from .a1111_controls import from_a1111
from .controls import ControlCatalog, NoControls, resolve_controls
from .family_rules import resolve_family_fields
from .fields import FAMILY_FIELDS, FAMILY_NOTES, AdapterCatalog, family_names, field_keys
from .image_fields import mask_image, start_image
from .parameter_errors import validate
from .parameters import default_size, inline_definitions, parameters_model
from .prompt_syntax import CLIP_PROMPTS, PromptSettings, check_prompts
from .recipe_defaults import apply_recipes
from .types import GenerationRequest, Limits, RefinerMode

# Request fields that only some samplers read (schedulers.sampler_fields).
SAMPLER_FIELDS = ("eta", "timestep_spacing", "timesteps")


class NoAdapters:
    def exists(self, name: str) -> bool:
        return False

    def names(self) -> list[str]:
        return []


class Given:
    """One request's validated fields (``parameters.py``), with which were given and how they were spelled."""

    def __init__(self, values: Any, given_as: dict[str, str], where: str):
        self.values, self.given_as, self.where = values, given_as, where

    def has(self, name: str) -> bool:
        return name in self.values.model_fields_set

    def label(self, name: str) -> str:
        return f"{self.where}{self.given_as.get(name, name)}"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.values, name)


class RequestParser:
    """Turns a mapping of parameters into a :class:`GenerationRequest`, or raises InvalidInput.
    Each field's own rules are the :func:`parameters_model`'s; the rules between fields are here."""

    def __init__(self, limits: Limits, model: ModelCapabilities, adapters: AdapterCatalog | None = None,
                 prompts: PromptSettings = PromptSettings(),
                 savings: step_savings.SavingsDefaults = step_savings.SavingsDefaults(),
                 controls: ControlCatalog | None = None):
        self.limits = limits
        self.controls = controls or NoControls()
        self.model = model
        self.adapters = adapters or NoAdapters()
        self.prompts = prompts
        self.savings = savings
        self.parameters = parameters_model(limits, model)

    def schema(self) -> dict[str, Any]:
        """JSON Schema (draft 2020-12, self-contained) of the parameters :meth:`parse` takes, with
        this server's bounds and this model's defaults; its properties are the canonical names."""
        schema = inline_definitions(self.parameters.model_json_schema(by_alias=True))
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}

    def check_total_images(self, requests: list[GenerationRequest], field: str) -> None:
        """One HTTP/gRPC request may carry several prompts; together they get --max_images."""
        total = sum(r.num_images for r in requests)
        if total > self.limits.max_images:
            raise InvalidInput(
                f"{field}: {total} images asked for in one request; the server limit is {self.limits.max_images}"
            )

    def check_fields(self, values: Mapping[str, Any], where: str = "") -> None:
        """Reject unknown field names in a partial set of parameters (e.g. shared defaults)."""
        field_keys(values, where)

    def parse(self, values: Mapping[str, Any], where: str = "") -> GenerationRequest:
        """Validate ``values``; ``where`` prefixes field names in errors (e.g. ``instances[2].``)."""
        if not isinstance(values, Mapping):
            raise InvalidInput(f"{where or 'request'}: expected an object of generation parameters")
        values, units = from_a1111(values, where)  # AUTOMATIC1111's ControlNet units as controls
        try:
            return self._parse(values, where)
        except InvalidInput as exc:  # errors in the units' terms, as the client sent them
            raise InvalidInput(units.rename(exc.reason)) from None

    def _parse(self, values: Mapping[str, Any], where: str) -> GenerationRequest:
        values = apply_recipes(values, self.adapters, where)  # adapter recipes fill fields left out
        v = Given(*validate(self.parameters, values, where, self.adapters), where)
        lim, model = self.limits, self.model
        for name, families in FAMILY_FIELDS.items():
            if v.has(name) and model.family not in families and not (name == "prompt_syntax" and v.prompt_syntax == "plain"):
                raise InvalidInput(
                    f"{v.label(name)}: only {family_names(families)} models accept this "
                    f"field; the loaded model is a {model.pipeline_class}{FAMILY_NOTES.get(name, '')}"
                )
        if model.family == "sd3" and not model.has_t5:
            for name in ("prompt_3", "negative_prompt_3"):
                if v.has(name):
                    raise InvalidInput(
                        f"{v.label(name)}: the T5 encoder is not loaded (--drop_t5), so it would have no effect"
                    )
        syntax = v.prompt_syntax or (self.prompts.default_syntax if model.family in FAMILY_FIELDS["prompt_syntax"]
                                     else "plain")
        if syntax != "plain":
            check_prompts({v.label(n): getattr(v, n) for n in CLIP_PROMPTS}, syntax, self.prompts.embeddings)
        savings = step_savings.resolve(v, model.family, self.savings)
        family_fields = resolve_family_fields(v, model, savings["cache"])
        scheduler = v.scheduler
        takes = sampler_fields(scheduler, model.scheduler_class, model.scheduler_family)
        for name in SAMPLER_FIELDS:
            if v.has(name) and name not in takes:
                raise InvalidInput(
                    f"{v.label(name)}: the {scheduler or model.scheduler_class} scheduler does not take it; "
                    f"schedulers that do: {', '.join(samplers_taking(name, model.scheduler_family))}"
                )

        start = start_image(v, model, lim)
        width, height = v.width, v.height
        if start is not None and not (v.has("width") and v.has("height")):  # sizes from the image
            width, height = default_size(model, lim, start.size)
            if v.has("width") or v.has("height"):  # one side given: keep the aspect
                given = v.width if v.has("width") else v.height
                ratio = start.size[1] / start.size[0] if v.has("width") else start.size[0] / start.size[1]
                other = max(model.size_multiple, int(given * ratio) // model.size_multiple * model.size_multiple)
                width, height = (given, other) if v.has("width") else (other, given)
        if width * height > lim.max_pixels:
            raise InvalidInput(
                f"{where}width x height: {width}x{height} = {width * height} pixels exceeds the "
                f"server limit of {lim.max_pixels} pixels"
            )
        steps = self._steps(v, start)
        mask = mask_image(v, model, lim, start)
        controls = resolve_controls(v, self.controls, model, lim, image=start is not None, cache=savings["cache"])
        refiner = self._refiner(v, inpaint=mask is not None, custom=v.has("timesteps"))
        strength = self._strength(v, start, mask, steps)
        high_noise_frac, refiner_strength = v.high_noise_frac, v.refiner_strength
        if refiner is RefinerMode.REFINE and int(steps * refiner_strength) < 1:
            raise InvalidInput(
                f"{v.label('refiner_strength')}: {refiner_strength} of {steps} steps leaves the refiner no "
                f"step; raise refiner_strength or num_inference_steps"
            )
        fewest = min_steps(scheduler, model.scheduler_class, model.scheduler_family)
        if steps < fewest:
            raise InvalidInput(
                f"{v.label('num_inference_steps')}: the {scheduler or model.scheduler_class} scheduler "
                f"needs at least {fewest} steps, got {steps}"
            )
        most = max_steps(scheduler, model.scheduler_class, model.scheduler_family)
        if most is not None and steps > most and not v.has("timesteps"):  # a custom schedule may be longer
            raise InvalidInput(
                f"{v.label('num_inference_steps')}: the {scheduler or model.scheduler_class} scheduler "
                f"runs at most {most} steps (its original_inference_steps), got {steps}"
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
        negative_prompt = v.negative_prompt
        if negative_prompt is None and (v.negative_prompt_2 is not None or v.negative_prompt_3 is not None):
            # diffusers ignores the other negative prompts when negative_prompt is absent; make them count.
            negative_prompt = ""
        return GenerationRequest(
            prompt=v.prompt,
            prompt_2=v.prompt_2,
            prompt_3=v.prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=v.negative_prompt_2,
            negative_prompt_3=v.negative_prompt_3,
            prompt_syntax=syntax,
            **family_fields,
            **savings,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=v.guidance_scale,
            seed=secrets.randbits(63) if v.seed == -1 else v.seed,
            num_images=v.num_images,
            scheduler=scheduler,
            eta=v.eta if v.has("eta") else default_eta(scheduler, model.scheduler_class, model.scheduler_family),
            timestep_spacing=v.timestep_spacing,
            timesteps=v.timesteps,
            refiner=refiner,
            high_noise_frac=high_noise_frac,
            refiner_strength=refiner_strength,
            original_size=v.original_size,
            crops_coords_top_left=v.crops_coords_top_left,
            target_size=v.target_size,
            image_format=v.format,
            quality=v.quality,
            loras=tuple((lora.name, lora.scale) for lora in v.loras),
            image=image_input.as_rgb(start, (width, height)) if start is not None else None,
            mask=image_input.as_mask(mask, (width, height)) if mask is not None else None,
            strength=strength,
            controls=controls,
        )

    def _steps(self, v: Given, start) -> int:
        """num_inference_steps, or the length of the timesteps given outright (text-to-image only:
        an image's strength picks its steps from a schedule the server makes)."""
        if not v.has("timesteps"):
            return v.num_inference_steps
        count = len(v.timesteps)
        if v.has("num_inference_steps") and v.num_inference_steps != count:
            raise InvalidInput(
                f"{v.label('num_inference_steps')}: {v.num_inference_steps} disagrees with the {count} timesteps "
                f"given; give either, or both agreeing"
            )
        if start is not None:
            raise InvalidInput(
                f"{v.label('timesteps')}: a custom schedule is for text-to-image only; with an image, give "
                f"num_inference_steps and strength"
            )
        if v.has("timestep_spacing"):
            raise InvalidInput(
                f"{v.label('timestep_spacing')}: timesteps set the schedule outright, so a spacing would have "
                f"no effect; give one of them"
            )
        return count

    def _refiner(self, v: Given, inpaint: bool, custom: bool) -> RefinerMode:
        """Inpainting and custom timesteps run on the base model alone: they default to, and allow
        only, none (the refiner's part of a schedule is cut from the base's)."""
        if not v.has("refiner") or v.refiner is True:
            base_only = inpaint or custom
            return RefinerMode.ENSEMBLE if self.model.has_refiner and not base_only else RefinerMode.NONE
        mode = RefinerMode.NONE if v.refiner is False else RefinerMode(v.refiner)
        if mode is not RefinerMode.NONE and inpaint:
            raise InvalidInput(f"{v.label('refiner')}: inpainting (a mask) runs on the base model only; allowed: none")
        if mode is not RefinerMode.NONE and custom:
            raise InvalidInput(f"{v.label('refiner')}: custom timesteps run on the base model only; allowed: none")
        return mode

    def _strength(self, v: Given, start, mask, steps: int) -> float | None:
        if start is None:
            if v.has("strength"):
                raise InvalidInput(f"{v.label('strength')}: applies to a start image; give image as well")
            return None
        strength = v.strength if v.has("strength") else 1.0 if mask is not None else 0.8
        # the pipelines' get_timesteps: SD3's and FLUX's keep the fraction where the others truncate first
        flow = self.model.family in ("sd3", "flux")
        left = steps - int(steps - steps * strength) if flow else int(steps * strength)
        if left < 1:
            raise InvalidInput(
                f"{v.label('strength')}: {strength} of {steps} steps leaves no denoising step; raise strength "
                f"or num_inference_steps"
            )
        return strength
