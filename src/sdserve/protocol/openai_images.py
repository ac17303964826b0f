"""OpenAI Images API (``POST /openai/v1/images/generations``), so the ``openai`` SDK works.

OpenAI's fields map onto sdserve's: ``n`` -> num_images, ``size`` "WxH" -> width/height,
``output_format`` -> format, ``output_compression`` -> quality (JPEG/WebP), ``quality``
(low/medium/high/...) -> a fraction of the default steps. Every other sdserve generation parameter
(negative_prompt, seed, num_inference_steps, guidance_scale, scheduler, refiner, ...) may be given
in the body too (the SDK's ``extra_body``). Images come back as ``b64_json``; ``url`` is refused.
"""

from __future__ import annotations

import time
from typing import Any

from kserve.errors import InvalidInput

from ..fields import ALIASES, FIELDS
from ..imaging import b64, encode_image
from ..request import GenerationRequest, GenerationResult
from ..validation import RequestParser

# OpenAI quality names -> multiple of the default number of steps.
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "auto": 1.0, "standard": 1.0, "high": 1.5, "hd": 1.5, "xhigh": 2.0, "max": 2.0}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
IGNORED = ("user", "style", "moderation", "safety_identifier")  # accepted, no effect here
_OPENAI = {"n", "size", "output_format", "output_compression", "quality"}  # mapped below
_HANDLED = {"model", "response_format", "stream", "partial_images", "background"}  # checked below
# sdserve fields whose OpenAI counterpart is used instead (n, output_format, output_compression)
SHADOWED = {"num_images", "num_images_per_prompt", "format", "output_image_format"}


class ModelNotServed(Exception):
    """The body names a model this server does not serve."""


def parse_openai(body: Any, parser: RequestParser, model_name: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object with at least 'prompt'")
    values = dict(body)
    model = values.pop("model", None)
    if model not in (None, model_name):
        raise ModelNotServed(f"model {model!r} is not served here; this server serves {model_name!r}")
    response_format = values.pop("response_format", None) or "b64_json"
    if response_format != "b64_json":
        raise InvalidInput(
            f"response_format: {response_format!r} is not supported: sdserve returns images in the "
            f"response and hosts no files; use 'b64_json'"
        )
    if values.pop("stream", False):
        raise InvalidInput("stream: streaming image generation is not supported; leave stream unset or false")
    if values.pop("partial_images", 0):
        raise InvalidInput("partial_images: partial images are not supported; leave it unset or 0")
    if values.pop("background", None) == "transparent":  # (any other value is harmless here)
        raise InvalidInput("background: 'transparent' is not supported; allowed: auto, opaque")
    for name in IGNORED:
        values.pop(name, None)
    for name in values:
        if name in SHADOWED or (name not in FIELDS and name not in ALIASES and name not in _OPENAI):
            allowed = sorted(_OPENAI | _HANDLED | set(IGNORED) | (set(FIELDS) - SHADOWED))
            raise InvalidInput(f"{name}: unknown field; allowed: {', '.join(allowed)}")

    mapped: dict[str, Any] = {k: v for k, v in values.items() if k not in _OPENAI}
    if "n" in values:
        mapped["num_images"] = values["n"]
    if values.get("size") not in (None, "auto"):
        mapped.update(_size(values["size"]))
    fmt = values.get("output_format")
    if fmt is not None:
        if fmt not in OUTPUT_FORMATS:
            raise InvalidInput(f"output_format: must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
        mapped["format"] = fmt
    if values.get("output_compression") is not None:
        mapped["quality"] = values["output_compression"]
    quality = values.get("quality")
    if quality is not None and "num_inference_steps" not in mapped:
        if not isinstance(quality, str) or quality not in QUALITY_STEPS:
            raise InvalidInput(f"quality: must be one of {', '.join(QUALITY_STEPS)}, got {quality!r}")
        default = min(parser.model.default_steps, parser.limits.max_steps)
        mapped["num_inference_steps"] = max(1, min(parser.limits.max_steps, round(default * QUALITY_STEPS[quality])))
    return parser.parse(mapped)



def _size(size: Any) -> dict[str, Any]:
    try:
        width, height = (int(part) for part in str(size).lower().split("x"))
    except ValueError:
        raise InvalidInput(f"size: must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto', got {size!r}") from None
    return {"width": width, "height": height}


def encode_openai(
    request: GenerationRequest, result: GenerationResult, model_name: str, warnings: list[str] | None = None
) -> dict[str, Any]:
    """The ImagesResponse body (runs image encoding: call it off the event loop)."""
    data = [
        {
            "b64_json": b64(encode_image(img, request.image_format, request.quality, request.image_parameters(seed, model_name))),
            "revised_prompt": None,
            "seed": seed,
        }
        for img, seed in zip(result.images, result.seeds)
    ]
    body = {
        "created": int(time.time()),
        "data": data,
        "output_format": request.image_format,
        "size": f"{request.width}x{request.height}",
    }
    if warnings:
        body["warnings"] = warnings
    return body


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; ``param`` is the field the message starts with, when it names one."""
    head = message.split(":", 1)[0]
    param = head if ":" in message and " " not in head else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
