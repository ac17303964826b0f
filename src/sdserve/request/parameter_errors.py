"""Request validation against the :func:`parameters.parameters_model` model, with pydantic's errors
worded as sdserve's 400s: the field as the client spelled it, what it must be, what was given."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from kserve.errors import InvalidInput
from pydantic import BaseModel, ValidationError

from .fields import ALIASES, AdapterCatalog, field_keys


@dataclass(frozen=True)
class Expect:
    """What a field must be, for its error message: "<field>: must be <text>, got <value>"."""

    text: str


def validate(
    parameters: type[BaseModel], values: Mapping[str, Any], where: str = "", adapters: AdapterCatalog | None = None
) -> tuple[BaseModel, dict[str, str]]:
    """``values`` checked field by field, and each field's name -> the key the client gave it as;
    raises InvalidInput naming the field (``where`` first) and what it must be."""
    given_as = field_keys(values, where)
    present = {key: value for key, value in values.items() if value is not None}  # None: the default
    try:
        return parameters.model_validate(present, context={"adapters": adapters}), given_as
    except ValidationError as exc:
        raise InvalidInput(_message(parameters, exc.errors()[0], present, where)) from None


def _message(parameters: type[BaseModel], error: Any, values: Mapping[str, Any], where: str) -> str:
    """pydantic's error as sdserve words it; ``loc`` starts with the key as the client spelled it."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    if kind == "sdserve":
        return f"{where}{_path(loc)}{ctx['suffix']}: {ctx['message']}"
    if kind == "missing" and isinstance(loc[-1], str):  # a field (of an object in a list too), not a list item
        return f"{where}{_path(loc)}: required field is missing"
    if kind == "extra_forbidden" and (inner := _model_at(parameters, loc[:-1])) is not None:
        return f"{where}{_path(loc)}: unknown field; allowed: {', '.join(inner.model_fields)}"
    if kind == "string_too_long" and len(loc) == 1:
        return f"{where}{_path(loc)}: {len(error['input'])} characters is over the limit of {ctx['max_length']}"
    depth, expect = _expectation(parameters, loc)
    if expect is None:
        return f"{where}{_path(loc)}: not an accepted value, got {error['input']!r:.200}"
    return f"{where}{_path(loc[:depth])}: must be {expect}, got {_given(values, loc[:depth], error['input'])!r:.200}"


def _path(loc: tuple) -> str:
    return str(loc[0]) + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])


def _expectation(model: Any, loc: tuple) -> tuple[int, str | None]:
    """The innermost field along ``loc`` with an :class:`Expect`, as (its depth in loc, its text)."""
    found: tuple[int, str | None] = (0, None)
    for depth, part in enumerate(loc, 1):
        if isinstance(part, int):
            continue
        info = model.model_fields.get(ALIASES.get(part, part)) if model is not None else None
        if info is None:
            break
        expect = _expect(info.metadata, info.annotation)
        if expect is not None:
            found = (depth, expect.text)
        model = _submodel(info.annotation)
    return found


def _model_at(model: Any, loc: tuple) -> type[BaseModel] | None:
    """The model of the object at ``loc`` (a control inside the controls list), if any."""
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(ALIASES.get(part, part)) if model is not None else None
        if info is None:
            return None
        model = _submodel(info.annotation)
    return model


def _expect(metadata: Any, annotation: Any) -> Expect | None:
    for item in (*metadata, *getattr(annotation, "__metadata__", ())):
        if isinstance(item, Expect):
            return item
    return next(filter(None, (_expect((), arg) for arg in get_args(annotation))), None)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model inside a field's type (LoraSpec inside tuple[LoraSpec, ...]), if any."""
    if isinstance(annotation, type) and not get_args(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, (_submodel(arg) for arg in get_args(annotation))), None)


def _given(values: Any, path: tuple, default: Any) -> Any:
    """The value at ``path`` as the client sent it (lists perhaps as JSON text)."""
    for part in path:
        try:
            values = (json.loads(values) if isinstance(values, str) else values)[part]
        except (ValueError, LookupError, TypeError):
            return default
    return values
