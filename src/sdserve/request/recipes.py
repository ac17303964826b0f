"""Adapter recipes: an ``sdserve.json`` beside a LoRA adapter's weights, presetting the generation
fields the adapter was made for (a few-step LCM or Lightning LoRA needs its sampler, its step
count and a low guidance scale), its default LoRA ``scale``, and descriptive keys that are only
listed::

    {"scheduler": "LCM", "num_inference_steps": 4, "guidance_scale": 1.0, "scale": 1.0,
     "description": "LCM-LoRA: 4-step SDXL"}

A recipe is JSON data, never code. It is read when the adapter folder is scanned and validated as a
request is, against the loaded model and the server's limits; a recipe that fails (bad JSON, an
unknown key, a value out of range, a sampler of the other family) is logged and its adapter is not
offered. A request naming adapters gets their recipes' fields for the fields it leaves out (fields
it gives, under any alias, win), and each of those adapters its recipe's scale unless the request
gives one; two named adapters whose recipes disagree on a field the request leaves out are a 400.
The recipe of the adapter fused into the model (``--fuse_lora``) is the server's default for every
request, below the recipes of the adapters a request names. A recipe's field that would contradict
one set above it stays out rather than make a 400: its sizes beside a start image, its timesteps
beside num_inference_steps or timestep_spacing (and the other way round), its sampler settings
(eta, timestep_spacing, timesteps) beside another scheduler.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from kserve.errors import InvalidInput

from .fields import ALIASES, FIELDS, LORA_SCALE
from .parameter_errors import validate
from .parameters import default_size
from .recipe_defaults import RECIPE_FILE
from .validation import RequestParser

# The generation fields a recipe may preset; those the request model does not know are left out.
PRESETS = (
    "scheduler", "num_inference_steps", "guidance_scale", "timestep_spacing", "eta", "timesteps",
    "width", "height", "negative_prompt", "refiner", "high_noise_frac", "refiner_strength",
)
INFO = ("description", "instance_prompt", "license")  # listed in the model metadata, nothing else
MAX_BYTES = 64 * 1024
MAX_INFO_LENGTH = 2000

Check = Callable[[dict[str, Any]], dict[str, Any]]


class RecipeError(ValueError):
    """Why a recipe is refused (no path in it: clients may be shown it)."""


@dataclass(frozen=True)
class Recipe:
    fields: dict[str, Any]  # canonical field name -> value, as validation normalised it
    scale: float | None = None
    info: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.fields)
        if self.scale is not None:
            out["scale"] = self.scale
        return {**out, **self.info}


@dataclass(frozen=True)
class Fused:
    """The adapter fused into the base weights at start-up (``--fuse_lora``)."""

    name: str
    scale: float
    recipe: Recipe | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "scale": self.scale}
        return {**out, "recipe": self.recipe.describe()} if self.recipe is not None else out


def preset_fields() -> tuple[str, ...]:
    return tuple(name for name in PRESETS if name in FIELDS)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise RecipeError(f"key {twice[0]!r} given twice")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise RecipeError(f"{name} is not a number JSON allows")


def _scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not -LORA_SCALE <= value <= LORA_SCALE:
        raise RecipeError(f"scale: must be a number from {-LORA_SCALE} to {LORA_SCALE}, got {value!r:.100}")
    return float(value)


def parse_recipe(text: str, check: Check | None = None) -> Recipe:
    """A recipe from its JSON text; ``check`` validates (and normalises) its generation fields
    against the loaded model. Raises RecipeError."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"must be a JSON object, got {type(data).__name__}")
    presets = preset_fields()
    fields: dict[str, Any] = {}
    scale, info = None, {}
    for key, value in data.items():
        if key == "scale":
            scale = _scale(value)
        elif key in INFO:
            if not isinstance(value, str) or len(value) > MAX_INFO_LENGTH:
                raise RecipeError(f"{key}: must be a string of at most {MAX_INFO_LENGTH} characters")
            info[key] = value
        else:
            name = ALIASES.get(key, key)
            if name not in presets:
                raise RecipeError(
                    f"{key}: not a key a recipe may set; allowed: {', '.join((*presets, 'scale', *INFO))}"
                )
            if name in fields:
                raise RecipeError(f"{key}: given twice (as {name} and an alias)")
            if value is None:
                raise RecipeError(f"{key}: null; leave the key out for the model's default")
            fields[name] = value
    if check is not None and fields:
        fields = check(fields)
    return Recipe(fields, scale, info)


def read_recipe(folder: Path, check: Check | None = None) -> Recipe | None:
    """``folder``'s recipe, None when it has none; raises RecipeError."""
    path = folder / RECIPE_FILE
    if not path.exists():
        return None
    if not path.is_file():
        raise RecipeError(f"{RECIPE_FILE} is not a file")
    if path.stat().st_size > MAX_BYTES:
        raise RecipeError(f"{RECIPE_FILE} is over {MAX_BYTES // 1024} KiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{RECIPE_FILE} is not UTF-8 text") from None
    except OSError as exc:
        raise RecipeError(f"cannot read {RECIPE_FILE}: {exc.strerror or type(exc).__name__}") from None
    return parse_recipe(text, check)


def _plain(value: Any) -> Any:
    """A validated value as JSON shows it (tuples as lists, enums as their value)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


def _blank_png(width: int, height: int, mode: str = "RGB") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def checker(limits, capabilities) -> Check:
    """Validates a recipe's fields as a request of this server (limits) to this model would be:
    each field's rules, then the rules between fields. Returns the fields as validation resolved
    them (a sampler's canonical name, numbers as their type)."""
    parser = RequestParser(limits, capabilities)
    start: dict[str, Any] = {}
    if capabilities.needs_image or capabilities.needs_mask:  # such a model takes no request without one
        width, height = default_size(capabilities, limits)
        start["image"] = _blank_png(width, height)
        if capabilities.needs_mask:
            start["mask"] = _blank_png(width, height, "L")

    def check(fields: dict[str, Any]) -> dict[str, Any]:
        request = {"prompt": "recipe check", **start, **fields}
        try:
            values, _ = validate(parser.parameters, request)
            parser.parse(request)
        except InvalidInput as exc:
            raise RecipeError(str(exc.reason)) from None
        return {name: _plain(getattr(values, name)) for name in fields}

    return check
