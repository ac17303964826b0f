"""OpenAI Images API: ``POST /openai/v1/images/generations`` (JSON) and ``/images/edits``
(multipart), so the ``openai`` SDK works.

OpenAI's fields map onto sdserve's: ``n`` -> num_images, ``size`` "WxH" -> width/height,
``output_format`` -> format, ``output_compression`` -> quality (JPEG/WebP), ``quality``
(low/medium/high/...) -> a fraction of the default steps. Every other sdserve generation parameter
(negative_prompt, seed, num_inference_steps, guidance_scale, scheduler, refiner, strength, ...) may
be given too (the SDK's ``extra_body``). Images come back as ``b64_json``; ``url`` is refused.

Edits follow OpenAI's mask convention (fully transparent = repaint) and convert it to sdserve's
(white = repaint): a mask without transparent pixels is read as grayscale, and without a mask an
image's own transparent pixels are repainted (an opaque image alone is img2img).

Every OpenAI field is checked whether or not it has an effect here, so a typo is a 400, never a
silently different image. ``stream: true`` (with ``partial_images``, and sdserve's
``stream_progress``) asks for server-sent events: see ``openai_stream.py``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from kserve.errors import InvalidInput

from ..request.fields import ALIASES, FIELDS
from ..request.image_input import alpha_mask, decode_image, has_transparency
from ..request.types import GenerationRequest, GenerationResult
from ..request.validation import RequestParser
from .image_encoding import b64, encode_image
from .multipart_form import form_values

# OpenAI quality names -> multiple of the default number of steps.
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "auto": 1.0, "standard": 1.0, "high": 1.5, "hd": 1.5, "xhigh": 2.0, "max": 2.0}
# How stream events name a quality: the streaming event types know no DALL-E names.
_QUALITY_ECHO = {"standard": "medium", "hd": "high"}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("auto", "opaque")  # "transparent" is refused: the pipelines make opaque images
MAX_PARTIAL_IMAGES = 8  # OpenAI allows 3; previews are cheap here
# Accepted with no effect here, but checked: field -> allowed values (None: any string).
IGNORED: dict[str, tuple[str, ...] | None] = {
    "user": None, "safety_identifier": None, "style": ("vivid", "natural"), "moderation": ("low", "auto"),
}
# how closely to follow the input: the mask and strength say that here
EDIT_IGNORED: dict[str, tuple[str, ...] | None] = {"input_fidelity": ("high", "low")}
_OPENAI = {"n", "size", "output_format", "output_compression", "quality"}  # mapped below
# checked below, and not passed on
_HANDLED = {"model", "response_format", "stream", "partial_images", "stream_progress", "background"}
# sdserve fields whose OpenAI counterpart is used instead (n, output_format, output_compression)
SHADOWED = {"num_images", "num_images_per_prompt", "format", "output_image_format"}
# Fields that set the number of steps, so that quality does not.
_STEP_FIELDS = {"num_inference_steps", "timesteps"} | {k for k, v in ALIASES.items() if v == "num_inference_steps"}
# Multipart carries only text: the SDK sends booleans as "true"/"false" (lists as repeated key[]).


class ModelNotServed(Exception):
    """The body names a model this server does not serve."""


@dataclass(frozen=True)
class EditForm:
    """An images/edits request: its multipart parts in order, text as str and files as bytes.
    ``parse_openai`` takes it in place of a JSON body, so both routes share one code path."""

    items: list[tuple[str, str | bytes]]


@dataclass(frozen=True)
class StreamOptions:
    """What a ``stream: true`` request asked for."""

    partial_images: int = 0  # previews per image before its final one
    progress: bool = False  # sdserve's stream_progress: queue and step events too


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed OpenAI images request: sdserve's request and what only the OpenAI answer needs."""

    request: GenerationRequest
    edit: bool  # images/edits (its events are named image_edit.*)
    quality: str  # as stream events name it: low, medium, high, xhigh, max or auto
    background: str  # auto or opaque
    stream: StreamOptions | None  # None: one JSON answer
    input_images: int = 0  # images the client sent (edits: the image, and a mask)


def parse_openai(body: Any, parser: RequestParser, model_name: str) -> GenerationRequest:
    """A generations JSON body, or an :class:`EditForm`, as a validated request."""
    return parse_openai_request(body, parser, model_name).request


def parse_openai_request(body: Any, parser: RequestParser, model_name: str) -> OpenAIRequest:
    """A generations JSON body, or an :class:`EditForm`, with its OpenAI-only options."""
    if isinstance(body, EditForm):
        return parse_openai_edit(body.items, parser, model_name)
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object with at least 'prompt'")
    values = dict(body)
    quality, background, stream = _check_openai(values, model_name, parser)
    return OpenAIRequest(parser.parse(_map_openai(values, parser)), False, quality, background, stream)


def parse_openai_edit(items: list[tuple[str, str | bytes]], parser: RequestParser, model_name: str) -> OpenAIRequest:
    """A multipart images/edits body: ``image`` (or ``image[]``, the first is used), an optional
    ``mask`` and the generations fields."""
    values = form_values(items)
    image_value = values.pop("image", None)
    mask_value = values.pop("mask", None)
    quality, background, stream = _check_openai(values, model_name, parser, extra=EDIT_IGNORED)
    if isinstance(image_value, list):
        image_value = image_value[0]
    if image_value is None or image_value in ("", b""):
        raise InvalidInput("image: required: the image to edit, a PNG, JPEG or WebP file (image=@in.png)")
    max_pixels = parser.limits.max_input_pixels
    image = decode_image(image_value, "image", max_pixels)
    if mask_value is not None:
        if isinstance(mask_value, list):
            raise InvalidInput(f"mask: give one mask, got {len(mask_value)}")
        mask = decode_image(mask_value, "mask", max_pixels)
        # a mask with nothing transparent (no alpha channel, or all opaque) is read as grayscale
        mask = alpha_mask(mask) if has_transparency(mask) else mask.convert("L")
    elif has_transparency(image):
        if parser.model.needs_image:  # else the parser would blame a mask the client never sent
            raise InvalidInput("image: its transparent pixels ask for inpainting, which the loaded model (an SDXL "
                               "refiner alone) does not do; send an opaque image")
        mask = alpha_mask(image)
    else:
        mask = None
    mapped = _map_openai(values, parser)
    mapped["image"] = image.convert("RGB")
    if mask is not None:
        mapped["mask"] = mask
    sent = 1 + (mask_value is not None)
    return OpenAIRequest(parser.parse(mapped), True, quality, background, stream, input_images=sent)


def _check_openai(values: dict[str, Any], model_name: str, parser: RequestParser,
                  extra: dict[str, tuple[str, ...] | None] | None = None) -> tuple[str, str, StreamOptions | None]:
    """Check every OpenAI field, used here or not; remove those with no sdserve counterpart, and
    refuse unknown fields. ``extra`` are more accepted-and-ignored fields. Returns the quality and
    background as events echo them, and the stream options (None: no stream)."""
    for name in [k for k, v in values.items() if v is None and (k in _OPENAI or k in _HANDLED)]:
        del values[name]  # the SDK's Optional fields: null means "the default"
    model = values.pop("model", None)
    if model not in (None, model_name):
        raise ModelNotServed(f"model {model!r} is not served here; this server serves {model_name!r}")
    response_format = values.pop("response_format", None) or "b64_json"
    if response_format != "b64_json":
        raise InvalidInput(
            f"response_format: {response_format!r} is not supported: sdserve returns images in the "
            f"response and hosts no files; use 'b64_json'"
        )
    background = values.pop("background", "auto")
    if background == "transparent":
        raise InvalidInput("background: 'transparent' is not supported; allowed: auto, opaque")
    _choice("background", background, BACKGROUNDS)
    stream = _boolean("stream", values.pop("stream", False))
    partial_images = _integer("partial_images", values.pop("partial_images", 0), 0, MAX_PARTIAL_IMAGES)
    progress = _boolean("stream_progress", values.pop("stream_progress", False))
    if progress and not stream:
        raise InvalidInput("stream_progress: only with stream: true (progress comes as server-sent events)")
    # Checked here even where another field makes them moot (quality with num_inference_steps,
    # output_compression with PNG): a value that is wrong is wrong either way.
    quality = values.get("quality", "auto")
    _choice("quality", quality, tuple(QUALITY_STEPS))
    if "n" in values:
        values["n"] = _integer("n", values["n"], 1, parser.limits.max_images)
    if "size" in values and values["size"] != "auto":
        _size(values["size"])
    if "output_format" in values:
        _choice("output_format", values["output_format"], OUTPUT_FORMATS)
    if "output_compression" in values:
        values["output_compression"] = _integer("output_compression", values["output_compression"], 0, 100)
    for name, allowed in {**IGNORED, **(extra or {})}.items():
        value = values.pop(name, None)
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"{name}: must be a string, got {value!r}")
        if value is not None and allowed is not None:
            _choice(name, value, allowed)
    for name in values:
        if name in SHADOWED or (name not in FIELDS and name not in ALIASES and name not in _OPENAI):
            allowed_fields = sorted(_OPENAI | _HANDLED | set(IGNORED) | set(extra or ()) | (set(FIELDS) - SHADOWED))
            raise InvalidInput(f"{name}: unknown field; allowed: {', '.join(allowed_fields)}")
    options = StreamOptions(partial_images, progress) if stream else None
    return _QUALITY_ECHO.get(quality, quality), background, options


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidInput(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):  # (a form's "true"/"false" are booleans by now)
        raise InvalidInput(f"{name}: must be true or false, got {value!r}")
    return value


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer in [lo, hi]; a form sends it as text."""
    number = value if isinstance(value, int) and not isinstance(value, bool) else \
        int(value.strip()) if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value) else None
    if number is None or not lo <= number <= hi:
        raise InvalidInput(f"{name}: must be an integer from {lo} to {hi}, got {value!r}")
    return number


def _map_openai(values: dict[str, Any], parser: RequestParser) -> dict[str, Any]:
    """OpenAI's names and (checked) values as sdserve's; the other fields pass through."""
    mapped: dict[str, Any] = {k: v for k, v in values.items() if k not in _OPENAI}
    if "n" in values:
        mapped["num_images"] = values["n"]
    if values.get("size", "auto") != "auto":
        mapped.update(_size(values["size"]))
    if "output_format" in values:
        mapped["format"] = values["output_format"]
    if "output_compression" in values:
        mapped["quality"] = max(1, values["output_compression"])  # OpenAI's 0 is the encoders' lowest, 1
    quality = values.get("quality")
    if quality is not None and not _STEP_FIELDS & mapped.keys():
        default = min(parser.model.default_steps, parser.limits.max_steps)
        mapped["num_inference_steps"] = max(1, min(parser.limits.max_steps, round(default * QUALITY_STEPS[quality])))
    return mapped


def _size(size: Any) -> dict[str, Any]:
    try:
        width, height = (int(part) for part in str(size).lower().split("x"))
    except ValueError:
        raise InvalidInput(f"size: must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto', got {size!r}") from None
    return {"width": width, "height": height}


def encode_final(request: GenerationRequest, image, seed: int, model_name: str) -> str:
    """One finished image as base64, with its parameters in a PNG (streamed or not: the same bytes)."""
    return b64(encode_image(image, request.image_format, request.quality, request.image_parameters(seed, model_name)))


def encode_openai(
    request: GenerationRequest, result: GenerationResult, model_name: str, warnings: list[str] | None = None,
    prompt_tokens: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The ImagesResponse body (runs image encoding: call it off the event loop)."""
    data = [
        {"b64_json": encode_final(request, img, seed, model_name), "revised_prompt": None, "seed": seed}
        for img, seed in zip(result.images, result.seeds)
    ]
    body = {
        "created": int(time.time()),
        "data": data,
        "output_format": request.image_format,
        "size": f"{request.width}x{request.height}",
    }
    if prompt_tokens:  # sdserve's: text encoder -> tokens of the prompt it read
        body["prompt_tokens"] = prompt_tokens
    if warnings:
        body["warnings"] = warnings
    return body


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; ``param`` is the field the message starts with, when it names one."""
    head = message.split(":", 1)[0]
    param = head if ":" in message and " " not in head else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
