"""Multipart form parts (OpenAI images/edits) as the JSON values they stand for, undoing how the
``openai`` SDK flattens lists and objects into parts."""

from __future__ import annotations

import re
from typing import Any

from kserve.errors import InvalidInput

BOOLEANS = {"stream", "stream_progress", "refiner"}
# name, name[], name[key] or name[][key]: how the SDK flattens lists and objects into form parts
KEY = re.compile(r"(?P<name>[^\[\]]+)(?:\[(?P<index>[^\[\]]*)\](?:\[(?P<key>[^\[\]]+)\])?)?")


def form_values(items: list[tuple[str, str | bytes]]) -> dict[str, Any]:
    """Form parts as JSON-like values, undoing the SDK's flattening: ``k[]`` parts make a list,
    ``k[x]`` an object, ``k[][x]`` a list of objects; ``image`` may repeat (like ``image[]``)."""
    values: dict[str, Any] = {}
    shapes: dict[str, str] = {}  # name -> the form it came in, so one name comes in one form only
    rows: dict[str, dict[str, list]] = {}  # name[][x] parts: name -> x -> values in order
    for key, value in items:
        match = KEY.fullmatch(key)
        if match is None:
            raise InvalidInput(f"{key}: unsupported form field name; use name, name[], name[key] or name[][key]")
        name, index, sub = match["name"], match["index"], match["key"]
        if isinstance(value, str) and name in BOOLEANS and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        shape = "name" if index is None else "name[]" if index == "" and sub is None else \
            "name[][key]" if index == "" else "name[key]" if sub is None else "nested"
        if shape == "nested":
            raise InvalidInput(f"{key}: unsupported form field name; use name, name[], name[key] or name[][key]")
        if shapes.setdefault(name, shape) != shape:
            raise InvalidInput(f"{key}: {name} is also given as {shapes[name].replace('name', name)}; use one form")
        if shape == "name" and name in values:
            if name != "image":  # curl -F image=@a -F image=@b means a list, as image[] does
                raise InvalidInput(f"{name}: given more than once; give it once")
            values[name] = (values[name] if isinstance(values[name], list) else [values[name]]) + [value]
        elif shape == "name":
            values[name] = value
        elif shape == "name[]":
            values.setdefault(name, []).append(value)
        elif shape == "name[key]":
            if index in values.setdefault(name, {}):
                raise InvalidInput(f"{key}: given more than once; give it once")
            values[name][index] = value
        else:
            rows.setdefault(name, {}).setdefault(sub, []).append(value)
    for name, columns in rows.items():
        # The SDK sends all name[][a] parts, then all name[][b] parts, so the i-th of each key
        # makes object i: unambiguous only when every object has every key.
        if len({len(column) for column in columns.values()}) != 1:
            raise InvalidInput(
                f"{name}: objects with different keys do not survive form encoding; give every object the "
                f"same keys, or send {name} as JSON text (e.g. extra_body={{'{name}': json.dumps([...])}})"
            )
        values[name] = [dict(zip(columns, row)) for row in zip(*columns.values())]
    return values
