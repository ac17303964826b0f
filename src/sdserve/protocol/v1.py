"""KServe v1 (``POST /v1/models/<name>:predict``): ``instances`` in, ``predictions`` out.

An instance is an object of generation parameters, a plain prompt string, or TorchServe-style
``{"data": "<prompt>"}``; a top-level ``parameters`` object gives defaults for every instance.
Each prediction carries ``image`` (the first image: ``{"b64", "format", "seed"}``, which is what
existing clients read) and ``images`` (all of them, each with its seed).
"""

from __future__ import annotations

import json
from typing import Any

from kserve.errors import InvalidInput

from ..request.types import GenerationRequest, GenerationResult
from ..request.validation import RequestParser
from .image_encoding import b64, encode_image

TOP_LEVEL = ("instances", "parameters")


def parse_v1(payload: Any, parser: RequestParser) -> list[GenerationRequest]:
    """One GenerationRequest per instance, all validated before any is queued."""
    if isinstance(payload, (bytes, str)):
        # KServe passes the raw body through when the Content-Type is not JSON (plain `curl -d`).
        try:
            payload = json.loads(payload)
        except ValueError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput('request body must be a JSON object like {"instances": [{"prompt": "..."}]}')
    unknown = sorted(set(payload) - set(TOP_LEVEL))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown top-level field; allowed: {', '.join(TOP_LEVEL)}")
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("instances: must be a non-empty list of prompts or parameter objects")
    defaults = payload.get("parameters") or {}
    if not isinstance(defaults, dict):
        raise InvalidInput("parameters: must be an object of default generation parameters")
    parser.check_fields(defaults, "parameters.")
    requests = [
        parser.parse({**defaults, **_instance_values(inst, i)}, f"instances[{i}].")
        for i, inst in enumerate(instances)
    ]
    parser.check_total_images(requests, "instances")
    return requests


def _instance_values(instance: Any, index: int) -> dict[str, Any]:
    where = f"instances[{index}]"
    if isinstance(instance, str):
        return {"prompt": instance}
    if not isinstance(instance, dict):
        raise InvalidInput(f"{where}: must be a prompt string or an object of generation parameters")
    values = dict(instance)
    if "data" in values:  # TorchServe-style {"data": "<prompt>"}
        if "prompt" in values:
            raise InvalidInput(f"{where}.data: give the prompt as either 'prompt' or 'data', not both")
        values["prompt"] = values.pop("data")
    return values


def encode_prediction(
    request: GenerationRequest, result: GenerationResult, warnings: list[str], model_name: str,
    prompt_tokens: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A v1 prediction for one instance (runs image encoding: call it off the event loop)."""
    fmt = request.image_format
    images = [
        {
            "b64": b64(encode_image(image, fmt, request.quality, request.image_parameters(seed, model_name))),
            "format": fmt.upper(),
            "seed": seed,
        }
        for image, seed in zip(result.images, result.seeds)
    ]
    prediction = {
        "image": images[0],
        "images": images,
        "model_name": model_name,
        "prompt": request.prompt,
        "parameters": request.describe(),
        "timings": {
            "queue_s": round(result.queue_seconds, 4),
            "generate_s": round(result.generate_seconds, 4),
            "batch_images": result.batch_images,
            **({"rows_saved": result.rows_saved} if result.rows_saved is not None else {}),
        },
    }
    if prompt_tokens:  # text encoder -> tokens of the prompt it read (markers included)
        prediction["prompt_tokens"] = prompt_tokens
    if warnings:
        prediction["warnings"] = warnings
    return prediction
