"""``sdserve generate --show_parameters``: each request field with its flag, type, default and
allowed values, read from a JSON Schema of the request: the server's (``/v1/models/<name>/schema``)
or, with ``--model_dir``, the local parser's.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .generate_options import FLAGS
from .local_model import load_local
from .stream_client import server_address

# fields set by other flags than FLAGS', for --show_parameters
OTHER_FLAGS = {"prompt": "PROMPT", "format": "-o", "image": "--image", "mask": "--mask", "loras": "--lora"}


def request_schema(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON Schema of one request's parameters: the server's, or the local parser's."""
    if args.model_dir:
        model = load_local(args)
        try:
            return model.parser.schema()
        finally:
            model.stop()
    import httpx

    url, headers = server_address(args)
    try:
        response = httpx.get(f"{url}/v1/models/{args.model_name}/schema", headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: {url}: {exc}") from None
    if response.status_code != 200:
        try:
            answer = response.json()
        except ValueError:
            answer = response.text
        reason = answer.get("error", answer) if isinstance(answer, dict) else answer
        raise SystemExit(f"error {response.status_code}: {reason}")
    return response.json()


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _types(node: dict[str, Any]) -> list[str]:
    if "anyOf" in node:
        return [t for branch in node["anyOf"] for t in _types(branch)]
    if "type" in node:
        return [node["type"]] if isinstance(node["type"], str) else list(node["type"])
    return ["object"] if "properties" in node else ["any"]


def _allowed(node: dict[str, Any]) -> str:
    """What a value may be, in words: choices, an interval, a length; "" where anything of its type goes."""
    if "anyOf" in node:
        return "; ".join(filter(None, (_allowed(branch) for branch in node["anyOf"])))
    if "enum" in node or "const" in node:  # a single choice comes as const
        return "one of: " + ", ".join(str(choice) for choice in node.get("enum", [node.get("const")]))
    if node.get("type") == "boolean":
        return "true or false"
    parts = []
    low = node.get("minimum", node.get("exclusiveMinimum"))
    high = node.get("maximum", node.get("exclusiveMaximum"))
    if low is not None or high is not None:
        parts.append(f"{'(' if 'exclusiveMinimum' in node else '['}{_value(low) if low is not None else '-inf'}, "
                     f"{_value(high) if high is not None else 'inf'}{')' if 'exclusiveMaximum' in node else ']'}")
    if "multipleOf" in node:
        parts.append(f"multiple of {_value(node['multipleOf'])}")
    if "maxLength" in node:
        parts.append(f"at most {node['maxLength']} characters")
    if node.get("type") == "array":
        least, most = node.get("minItems"), node.get("maxItems")
        parts.append(f"{least} item{'s' * (least != 1)}" if least is not None and least == most else
                     " ".join(filter(None, (least and f"at least {least}", most and f"at most {most}", "items"))))
        items = node.get("prefixItems") or ([node["items"]] if "items" in node else [])
        each = {_allowed(item) for item in items}
        if len(each) == 1 and "" not in each:
            parts.append(f"each {each.pop()}")
    return ", ".join(parts)


def describe_parameters(schema: dict[str, Any]) -> list[str]:
    """One line per field of the schema: name, flag, type, default, allowed values, description."""
    flags = {field: flag for field, (flag, _) in FLAGS.items()} | OTHER_FLAGS
    required = set(schema.get("required", ()))
    rows = [("field", "flag", "type", "default", "allowed", "")]
    for name, node in schema.get("properties", {}).items():
        default = "(required)" if name in required else _value(node.get("default"))
        types = "|".join(dict.fromkeys(_types(node)))
        rows.append((name, flags.get(name, ""), types, default, _allowed(node) or "-", node.get("description", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + f"  {row[4]}"
        + (f"  # {row[5]}" if row[5] else "")
        for row in rows
    ]
