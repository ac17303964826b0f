"""The value types of request fields: each an annotated type with its checks, its JSON Schema and
what the 400 says is allowed (``Expect``). ``parameters.py`` puts them together into one model."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from ..models.schedulers import FAMILIES, resolve_scheduler_name
from .fields import LORA_SCALE, MAX_LORAS, AdapterCatalog
from .parameter_errors import Expect
from .types import RefinerMode

SIZE_CONDITIONING = 16384  # bounds of the SDXL micro-conditioning pairs


def invalid() -> PydanticCustomError:
    """Reported as the field's :class:`Expect`."""
    return PydanticCustomError("sdserve_invalid", "invalid value")


def refuse(message: str, suffix: str = "") -> PydanticCustomError:
    """Reported as given, after the field's name (and ``suffix``, e.g. ``[1].name``)."""
    return PydanticCustomError("sdserve", "{message}", {"message": message, "suffix": suffix})


def as_number(value: Any) -> float | int | None:
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


def number(value: Any) -> float | int:
    number = as_number(value)
    if number is None:
        raise invalid()
    return number


def json_list(value: Any) -> Any:
    """v2/gRPC parameters are scalars: lists come as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise invalid() from None
    return value


# Constraints come before the validators: pydantic then puts them in the JSON Schema as keywords.
def integer(lo: int, hi: int, multiple: int | None = None) -> Any:
    expect = f"a multiple of {multiple} from {lo} to {hi}" if multiple else f"an integer from {lo} to {hi}"
    return Annotated[int, Field(ge=lo, le=hi, multiple_of=multiple), BeforeValidator(number), Expect(expect)]


def real(lo: float, hi: float, low_open: bool = False, high_open: bool = False) -> Any:
    bounds = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    limits = Field(gt=lo if low_open else None, ge=None if low_open else lo,
                   lt=hi if high_open else None, le=None if high_open else hi)
    return Annotated[float, limits, BeforeValidator(number), Expect(f"a finite number in {bounds}")]


def bounded_text(max_length: int) -> Any:
    return Annotated[str, Strict(), Field(max_length=max_length), Expect("a string")]


def number_list(value: Any) -> Any:
    """A list of numbers (JSON text too, as gRPC parameters carry it); the type checks the rest."""
    value = json_list(value)
    if not isinstance(value, (list, tuple)) or any(as_number(x) is None for x in value):
        raise invalid()
    return [as_number(x) for x in value]


def pair(lo: int, hi: int) -> Any:
    side = Annotated[int, Field(ge=lo, le=hi)]
    expect = Expect(f"a list of two integers from {lo} to {hi}")
    return Annotated[tuple[side, side], BeforeValidator(number_list), expect] | None


def fraction_pair() -> Any:
    """Two numbers from 0 to 1 (their order is checked with the field's meaning)."""
    fraction = Annotated[float, Field(ge=0.0, le=1.0), Strict(False)]
    return Annotated[tuple[fraction, fraction], BeforeValidator(number_list),
                     Expect("a list of two fractions [lo, hi] from 0 to 1, lo < hi")] | None


def timestep_list(total: int, most: int) -> Any:
    """A schedule given outright: 1 to ``most`` training timesteps (below ``total``), descending."""
    def descending(value: tuple[int, ...]) -> tuple[int, ...]:
        if any(later >= earlier for earlier, later in itertools.pairwise(value)):
            raise refuse(f"must be strictly descending, got {list(value)!r:.200}")
        return value

    step = Annotated[int, Field(ge=0, le=total - 1)]
    expect = Expect(f"a list of 1 to {most} integers from 0 to {total - 1}, strictly descending")
    return Annotated[tuple[step, ...], Field(min_length=1, max_length=most), BeforeValidator(number_list),
                     AfterValidator(descending), expect] | None


def layer_list(count: int) -> Any:
    """Distinct block indexes of a ``count``-block transformer, ascending."""
    def distinct(value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise refuse(f"must not repeat a layer, got {list(value)!r:.200}")
        return tuple(sorted(value))

    last = max(count - 1, 0)
    layer = Annotated[int, Field(ge=0, le=last)]
    expect = Expect(f"a list of 1 to {last + 1} distinct layer indexes from 0 to {last}")
    return Annotated[tuple[layer, ...], Field(min_length=1, max_length=last + 1), BeforeValidator(number_list),
                     AfterValidator(distinct), expect] | None


def choice(choices: Mapping[str, str]) -> Any:
    """A case-insensitive name, returned as ``choices`` maps it."""
    def lower(value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    return Annotated[
        Literal[tuple(choices)], BeforeValidator(lower), AfterValidator(choices.__getitem__),
        Expect(f"one of {', '.join(sorted(set(choices)))}"),
    ]


def scheduler_name(family: str) -> Any:
    def resolve(value: Any) -> str:
        if not isinstance(value, str):
            raise invalid()
        try:
            return resolve_scheduler_name(value, family)
        except KeyError as exc:
            raise refuse(exc.args[0]) from None

    return Annotated[Literal[tuple(FAMILIES[family])], BeforeValidator(resolve), Expect("a scheduler name")] | None


def refiner_mode(has_refiner: bool) -> Any:
    """A mode name, or true (the default mode) / false (none)."""
    modes = tuple(m.value for m in RefinerMode)
    allowed = modes if has_refiner else (RefinerMode.NONE.value,)

    def mode(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if not isinstance(value, str) or value.lower() not in modes:
            raise invalid()
        if value.lower() not in allowed:
            raise refuse(f"{value.lower()!r} needs a refiner model and none is loaded; allowed: none")
        return value.lower()

    return Annotated[Literal[allowed] | bool, BeforeValidator(mode), Expect(f"one of {', '.join(allowed)}")]


def _known_adapter(name: str, info: ValidationInfo) -> str:
    adapters: AdapterCatalog | None = (info.context or {}).get("adapters")
    if adapters is not None and not adapters.exists(name):  # no catalog: a schema check alone
        available = ", ".join(adapters.names()[:20]) or "none"
        raise refuse(f"no adapter named {name!r:.100}; available: {available}")
    return name


class LoraSpec(BaseModel):
    """One LoRA adapter from the server's catalog, applied to the base model."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, AfterValidator(_known_adapter)] = Field(description="adapter name")
    scale: Annotated[
        float, Field(ge=-LORA_SCALE, le=LORA_SCALE), BeforeValidator(number),
        Expect(f"a number from {-LORA_SCALE} to {LORA_SCALE}"),
    ] = Field(1.0, description="adapter weight")


def _lora_item(item: Any) -> Any:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, Mapping) or set(item) - {"name", "scale"} or not isinstance(item.get("name"), str):
        raise refuse(f'must be "name" or {{"name": "...", "scale": number}}, got {item!r:.200}')
    return dict(item)


def _lora_list(value: Any) -> Any:
    if isinstance(value, str) and not value.lstrip().startswith("["):
        raise invalid()
    value = json_list(value)
    if not isinstance(value, list) or len(value) > MAX_LORAS:  # before the items: pydantic checks them first
        raise invalid()
    return value


def _distinct(loras: tuple[LoraSpec, ...]) -> tuple[LoraSpec, ...]:
    for i, lora in enumerate(loras):
        if any(lora.name == other.name for other in loras[:i]):
            raise refuse(f"adapter {lora.name!r} is listed twice", suffix=f"[{i}].name")
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
