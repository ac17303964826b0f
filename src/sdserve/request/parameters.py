"""Each request field's rules (type, default, range, aliases), declared once as a pydantic model.

:func:`parameters_model` builds the model for one server, from its :class:`Limits` and the loaded
model's :class:`ModelCapabilities`; it both validates requests (``parameter_errors.validate``) and gives their
JSON Schema; ``parameter_errors.py`` words its errors. Rules between fields, or on a decoded
image, are ``validation.py``'s.
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache
from typing import Any

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
)

from ..models.capabilities import ModelCapabilities
from ..models.schedulers import SPACINGS
from .controls import controls_type
from .field_types import (
    SIZE_CONDITIONING,
    Image,
    Loras,
    Mask,
    bounded_text,
    choice,
    fraction_pair,
    integer,
    layer_list,
    pair,
    real,
    refiner_mode,
    scheduler_name,
    timestep_list,
)
from .fields import ALIASES, FIELDS
from .prompt_syntax import SYNTAXES
from .step_savings import CACHES
from .types import IMAGE_FORMATS, MAX_SEED, Limits


def default_size(
    model: ModelCapabilities, limits: Limits, image_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The start image's size, else the model's own; shrunk (keeping its aspect) when the server's
    limits are tighter, and rounded down to the model's size multiple."""
    width, height = image_size or (model.default_width, model.default_height)
    scale = min(1.0, limits.max_side / max(width, height), math.sqrt(limits.max_pixels / (width * height)))
    m = model.size_multiple
    return max(m, int(width * scale) // m * m), max(m, int(height * scale) // m * m)


def _accept_aliases(schema: dict[str, Any]) -> None:
    """Let the schema take aliases as the parser does: each is checked as its field and may not
    come with it (or another alias of it); any other name is refused."""
    properties = schema["properties"]
    dependent = schema.setdefault("dependentSchemas", {})
    for alias, name in ALIASES.items():
        same = {k: v for k, v in properties[name].items() if k not in ("title", "description", "default")}
        others = [name, *(a for a, n in ALIASES.items() if n == name and a != alias)]
        dependent[alias] = {
            "properties": {alias: {**copy.deepcopy(same), "description": f"alias of {name}"}},
            "not": {"anyOf": [{"required": [other]} for other in others]},
        }
    schema.pop("additionalProperties", None)
    schema["unevaluatedProperties"] = False  # sees the aliases declared in dependentSchemas


def inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with each ``$ref`` replaced by its definition, so that it stands alone wherever it
    is put (an OpenAPI document resolves ``#/$defs/...`` against its own root)."""
    definitions = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = definitions[node["$ref"].rsplit("/", 1)[-1]]
                node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return {k: inline(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


_DOC = """Generation parameters of one image request, as this server accepts them.

Numbers may also come as numeric strings and lists as JSON text (gRPC parameters carry only
strings); null means the field's default."""


@lru_cache(maxsize=64)
def parameters_model(limits: Limits, model: ModelCapabilities) -> type[BaseModel]:
    """The ``GenerationParameters`` model of a server with these limits serving this model."""
    text = bounded_text(limits.max_prompt_length)
    side = integer(limits.min_side, limits.max_side, model.size_multiple)
    width, height = default_size(model, limits)
    fraction = real(0.0, 1.0, low_open=True)
    rules: dict[str, tuple[Any, Any]] = {  # field: (type, default); ... is required
        "prompt": (text, ...),
        "negative_prompt": (text | None, None),
        "prompt_2": (text | None, None),
        "negative_prompt_2": (text | None, None),
        "prompt_3": (text | None, None),
        "negative_prompt_3": (text | None, None),
        "skip_guidance_layers": (layer_list(model.transformer_layers), None),
        "skip_layer_guidance_scale": (real(0.0, limits.max_guidance_scale) | None, None),
        "skip_layer_guidance_start": (real(0.0, 1.0) | None, None),
        "skip_layer_guidance_stop": (real(0.0, 1.0) | None, None),
        "prompt_syntax": (choice({s: s for s in SYNTAXES}) | None, None),
        "width": (side, width),
        "height": (side, height),
        "num_inference_steps": (integer(1, limits.max_steps), min(model.default_steps, limits.max_steps)),
        "guidance_scale": (real(0.0, limits.max_guidance_scale), model.default_guidance_scale),
        "true_cfg_scale": (real(1.0, limits.max_guidance_scale) | None, None),
        "seed": (integer(-1, MAX_SEED), -1),
        "num_images": (integer(1, limits.max_images), 1),
        "scheduler": (scheduler_name(model.scheduler_family), None),
        "eta": (real(0.0, 1.0) | None, None),
        "timestep_spacing": (choice({s: s for s in SPACINGS}) | None, None),
        "timesteps": (timestep_list(model.num_train_timesteps, limits.max_steps), None),
        "refiner": (refiner_mode(model.has_refiner), "ensemble" if model.has_refiner else "none"),
        "high_noise_frac": (real(0.0, 1.0, low_open=True, high_open=True), 0.8),
        "refiner_strength": (fraction, 0.3),
        "original_size": (pair(1, SIZE_CONDITIONING), None),
        "crops_coords_top_left": (pair(0, SIZE_CONDITIONING), None),
        "target_size": (pair(1, SIZE_CONDITIONING), None),
        "format": (choice(IMAGE_FORMATS), "png"),
        "quality": (integer(1, 100), 90),
        "guidance_interval": (fraction_pair(), None),
        "cache": (choice({c: c for c in CACHES}) | None, None),
        "cache_interval": (integer(1, 10) | None, None),
        "cache_threshold": (real(0.0, 1.0, low_open=True) | None, None),
        "loras": (Loras, ()),
        "controls": (controls_type(limits), ()),
        "image": (Image, None),
        "mask": (Mask, None),
        "strength": (fraction | None, None),
    }
    if rules.keys() != FIELDS.keys():
        raise AssertionError(f"fields without rules, or rules without fields: {set(rules) ^ set(FIELDS)}")
    fields: dict[str, Any] = {}
    for name, (kind, default) in rules.items():
        aliases = [a for a, n in ALIASES.items() if n == name]
        description = FIELDS[name] + (f" (aliases: {', '.join(aliases)})" if aliases else "")
        fields[name] = (kind, Field(default, description=description,
                                    validation_alias=AliasChoices(name, *aliases) if aliases else None))
    config = ConfigDict(extra="forbid", json_schema_extra=_accept_aliases)
    return create_model("GenerationParameters", __config__=config, __doc__=_DOC, **fields)
