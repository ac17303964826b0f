"""Each request field's rules (type, default, range, aliases), declared once as a pydantic model.

:func:`parameters_model` builds the model for one server, from its :class:`Limits` and the loaded
model's :class:`ModelCapabilities`; it both validates requests (``parameter_errors.validate``) and gives their
JSON Schema; ``parameter_errors.py`` words its errors. Rules between fields, or on a decoded
image, are ``validation.py``'s.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from ..models.capabilities import ModelCapabilities
from ..models.schedulers import FAMILIES, SPACINGS, resolve_scheduler_name
from .fields import ALIASES, FIELDS, LORA_SCALE, MAX_LORAS, AdapterCatalog
from .parameter_errors import Expect
from .types import IMAGE_FORMATS, MAX_SEED, Limits, RefinerMode

SIZE_CONDITIONING = 16384  # bounds of the SDXL micro-conditioning pairs


def _invalid() -> PydanticCustomError:
    """Reported as the field's :class:`Expect`."""
    return PydanticCustomError("sdserve_invalid", "invalid value")


def _refuse(message: str, suffix: str = "") -> PydanticCustomError:
    """Reported as given, after the field's name (and ``suffix``, e.g. ``[1].name``)."""
    return PydanticCustomError("sdserve", "{message}", {"message": message, "suffix": suffix})


def _as_number(value: Any) -> float | int | None:
    """A finite int/float (or a numeric string, as gRPC parameters carry them), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eEn") else int(value)
        except ValueError:
            return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _number(value: Any) -> float | int:
    number = _as_number(value)
    if number is None:
        raise _invalid()
    return number


def _json_list(value: Any) -> Any:
    """v2/gRPC parameters are scalars: lists come as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _invalid() from None
    return value


# Constraints come before the validators: pydantic then puts them in the JSON Schema as keywords.
def _integer(lo: int, hi: int, multiple: int | None = None) -> Any:
    expect = f"a multiple of {multiple} from {lo} to {hi}" if multiple else f"an integer from {lo} to {hi}"
    return Annotated[int, Field(ge=lo, le=hi, multiple_of=multiple), BeforeValidator(_number), Expect(expect)]


def _real(lo: float, hi: float, low_open: bool = False, high_open: bool = False) -> Any:
    bounds = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    limits = Field(gt=lo if low_open else None, ge=None if low_open else lo,
                   lt=hi if high_open else None, le=None if high_open else hi)
    return Annotated[float, limits, BeforeValidator(_number), Expect(f"a finite number in {bounds}")]


def _text(max_length: int) -> Any:
    return Annotated[str, Strict(), Field(max_length=max_length), Expect("a string")]


def _pair(lo: int, hi: int) -> Any:
    def numbers(value: Any) -> Any:
        value = _json_list(value)
        if not isinstance(value, (list, tuple)) or any(_as_number(x) is None for x in value):
            raise _invalid()
        return [_as_number(x) for x in value]

    side = Annotated[int, Field(ge=lo, le=hi)]
    expect = Expect(f"a list of two integers from {lo} to {hi}")
    return Annotated[tuple[side, side], BeforeValidator(numbers), expect] | None


def _timesteps(total: int, most: int) -> Any:
    """A schedule given outright: 1 to ``most`` training timesteps (below ``total``), descending."""
    def integers(value: Any) -> Any:
        value = _json_list(value)
        if not isinstance(value, (list, tuple)) or any(_as_number(x) is None for x in value):
            raise _invalid()
        return [_as_number(x) for x in value]

    def descending(value: tuple[int, ...]) -> tuple[int, ...]:
        if any(later >= earlier for earlier, later in itertools.pairwise(value)):
            raise _refuse(f"must be strictly descending, got {list(value)!r:.200}")
        return value

    step = Annotated[int, Field(ge=0, le=total - 1)]
    expect = Expect(f"a list of 1 to {most} integers from 0 to {total - 1}, strictly descending")
    return Annotated[tuple[step, ...], Field(min_length=1, max_length=most), BeforeValidator(integers),
                     AfterValidator(descending), expect] | None


def _choice(choices: Mapping[str, str]) -> Any:
    """A case-insensitive name, returned as ``choices`` maps it."""
    def lower(value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    return Annotated[
        Literal[tuple(choices)], BeforeValidator(lower), AfterValidator(choices.__getitem__),
        Expect(f"one of {', '.join(sorted(set(choices)))}"),
    ]


def _scheduler(family: str) -> Any:
    def resolve(value: Any) -> str:
        if not isinstance(value, str):
            raise _invalid()
        try:
            return resolve_scheduler_name(value, family)
        except KeyError as exc:
            raise _refuse(exc.args[0]) from None

    return Annotated[Literal[tuple(FAMILIES[family])], BeforeValidator(resolve), Expect("a scheduler name")] | None


def _refiner(has_refiner: bool) -> Any:
    """A mode name, or true (the default mode) / false (none)."""
    modes = tuple(m.value for m in RefinerMode)
    allowed = modes if has_refiner else (RefinerMode.NONE.value,)

    def mode(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if not isinstance(value, str) or value.lower() not in modes:
            raise _invalid()
        if value.lower() not in allowed:
            raise _refuse(f"{value.lower()!r} needs a refiner model and none is loaded; allowed: none")
        return value.lower()

    return Annotated[Literal[allowed] | bool, BeforeValidator(mode), Expect(f"one of {', '.join(allowed)}")]


def _known_adapter(name: str, info: ValidationInfo) -> str:
    adapters: AdapterCatalog | None = (info.context or {}).get("adapters")
    if adapters is not None and not adapters.exists(name):  # no catalog: a schema check alone
        available = ", ".join(adapters.names()[:20]) or "none"
        raise _refuse(f"no adapter named {name!r:.100}; available: {available}")
    return name


class LoraSpec(BaseModel):
    """One LoRA adapter from the server's catalog, applied to the base model."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, AfterValidator(_known_adapter)] = Field(description="adapter name")
    scale: Annotated[
        float, Field(ge=-LORA_SCALE, le=LORA_SCALE), BeforeValidator(_number),
        Expect(f"a number from {-LORA_SCALE} to {LORA_SCALE}"),
    ] = Field(1.0, description="adapter weight")


def _lora_item(item: Any) -> Any:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, Mapping) or set(item) - {"name", "scale"} or not isinstance(item.get("name"), str):
        raise _refuse(f'must be "name" or {{"name": "...", "scale": number}}, got {item!r:.200}')
    return dict(item)


def _lora_list(value: Any) -> Any:
    if isinstance(value, str) and not value.lstrip().startswith("["):
        raise _invalid()
    value = _json_list(value)
    if not isinstance(value, list) or len(value) > MAX_LORAS:  # before the items: pydantic checks them first
        raise _invalid()
    return value


def _distinct(loras: tuple[LoraSpec, ...]) -> tuple[LoraSpec, ...]:
    for i, lora in enumerate(loras):
        if any(lora.name == other.name for other in loras[:i]):
            raise _refuse(f"adapter {lora.name!r} is listed twice", suffix=f"[{i}].name")
    return loras


LoraItem = Annotated[LoraSpec, BeforeValidator(_lora_item, json_schema_input_type=str | LoraSpec)]
Loras = Annotated[
    tuple[LoraItem, ...], Field(max_length=MAX_LORAS), BeforeValidator(_lora_list), AfterValidator(_distinct),
    Expect(f'a list of at most {MAX_LORAS} adapters, each "name" or {{"name": "...", "scale": number}}'),
]
# Decoded (and checked) by image_input.py; init_images, as AUTOMATIC1111 sends it, is a list of one.
Image = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}, {"type": "null"},
]})]
Mask = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "null"}]})]


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
    text = _text(limits.max_prompt_length)
    side = _integer(limits.min_side, limits.max_side, model.size_multiple)
    width, height = default_size(model, limits)
    fraction = _real(0.0, 1.0, low_open=True)
    rules: dict[str, tuple[Any, Any]] = {  # field: (type, default); ... is required
        "prompt": (text, ...),
        "negative_prompt": (text | None, None),
        "prompt_2": (text | None, None),
        "negative_prompt_2": (text | None, None),
        "prompt_3": (text | None, None),
        "negative_prompt_3": (text | None, None),
        "width": (side, width),
        "height": (side, height),
        "num_inference_steps": (_integer(1, limits.max_steps), min(model.default_steps, limits.max_steps)),
        "guidance_scale": (_real(0.0, limits.max_guidance_scale), model.default_guidance_scale),
        "seed": (_integer(-1, MAX_SEED), -1),
        "num_images": (_integer(1, limits.max_images), 1),
        "scheduler": (_scheduler(model.scheduler_family), None),
        "eta": (_real(0.0, 1.0) | None, None),
        "timestep_spacing": (_choice({s: s for s in SPACINGS}) | None, None),
        "timesteps": (_timesteps(model.num_train_timesteps, limits.max_steps), None),
        "refiner": (_refiner(model.has_refiner), "ensemble" if model.has_refiner else "none"),
        "high_noise_frac": (_real(0.0, 1.0, low_open=True, high_open=True), 0.8),
        "refiner_strength": (fraction, 0.3),
        "original_size": (_pair(1, SIZE_CONDITIONING), None),
        "crops_coords_top_left": (_pair(0, SIZE_CONDITIONING), None),
        "target_size": (_pair(1, SIZE_CONDITIONING), None),
        "format": (_choice(IMAGE_FORMATS), "png"),
        "quality": (_integer(1, 100), 90),
        "loras": (Loras, ()),
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
