"""Reading v2 input tensors (REST JSON, REST binary data, gRPC typed or raw contents).

Every input's shape must hold exactly its data. Text inputs are UTF-8; image inputs are encoded
PNG/JPEG/WebP files, as base64 text in JSON and raw bytes elsewhere (never UTF-8-decoded).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import orjson
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image

from ..request import image_input

PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
IMAGE = "image"
MASK = "mask"
CONTROL_IMAGE = "control_image"  # one per control in the controls parameter, in its order


@dataclass
class TextAndImages:
    """The inputs, one entry per prompt (a [1] input already repeated for every prompt)."""

    prompts: list[str]
    negatives: list[str] | None
    images: list[Image.Image] | None
    masks: list[Image.Image] | None
    control_images: list[Image.Image] | None = None  # shared by every prompt


def read_inputs(inputs: list, max_input_pixels: int) -> TextAndImages:
    by_name = {inp.name: inp for inp in inputs}
    if len(by_name) != len(inputs):
        raise InvalidInput("inputs: each input name may appear once")
    negative, image, mask, control = (by_name.pop(name, None) for name in (NEGATIVE_PROMPT, IMAGE, MASK, CONTROL_IMAGE))
    if PROMPT in by_name:
        prompt = by_name.pop(PROMPT)
    elif len(by_name) == 1 and next(iter(by_name.values())).datatype == "BYTES":
        _, prompt = by_name.popitem()  # e.g. TorchServe's "input0"
    else:
        prompt = None
    if prompt is None or by_name:
        got = ", ".join(f"{i.name} ({i.datatype})" for i in inputs) or "none"
        raise InvalidInput(
            f"inputs: expected a BYTES input '{PROMPT}' (or a single BYTES input of any name) and optional "
            f"BYTES '{NEGATIVE_PROMPT}', '{IMAGE}', '{MASK}' and '{CONTROL_IMAGE}'; got {got}"
        )
    prompts = strings(prompt)
    if not prompts:
        raise InvalidInput(f"input {prompt.name}: no prompt given (empty tensor)")
    n = len(prompts)
    return TextAndImages(
        prompts,
        _per_prompt(negative, strings(negative), n) if negative is not None else None,
        _per_prompt(image, _images(image, n, max_input_pixels), n) if image is not None else None,
        _per_prompt(mask, _images(mask, n, max_input_pixels), n) if mask is not None else None,
        [image_input.decode_image(v, f"input {control.name}[{i}]", max_input_pixels)
         for i, v in enumerate(elements(control))] if control is not None else None,
    )


def _per_prompt(inp: Any, values: list, n: int) -> list:
    _check_count(inp, len(values), n)
    return values * n if len(values) == 1 else values


def _check_count(inp: Any, count: int, n: int) -> None:
    if count not in (1, n):
        raise InvalidInput(f"input {inp.name}: has {count} entries; give 1 or one per prompt ({n})")


def strings(inp: Any) -> list[str]:
    out = []
    for value in elements(inp):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input {inp.name}: must be UTF-8 text") from None
        if not isinstance(value, str):
            raise InvalidInput(f"input {inp.name}: expected strings, got {type(value).__name__}")
        out.append(value)
    return out


def _images(inp: Any, n: int, max_input_pixels: int) -> list[Image.Image]:
    # Decoded here (once for a [1] image shared by every prompt); str is base64 (JSON), bytes raw.
    values = elements(inp)
    _check_count(inp, len(values), n)  # before decoding anything
    return [image_input.decode_image(v, f"input {inp.name}[{i}]", max_input_pixels) for i, v in enumerate(values)]


def elements(inp: Any) -> list:
    """The flat elements of a BYTES input, checked against its shape."""
    if inp.datatype != "BYTES":
        raise InvalidInput(f"input {inp.name}: datatype must be BYTES, got {inp.datatype}")
    shape = list(inp.shape) if isinstance(inp.shape, (list, tuple)) else inp.shape
    if not isinstance(shape, list) or any(type(d) is not int or d < -1 for d in shape) or shape.count(-1) > 1:
        raise InvalidInput(
            f"input {inp.name}: shape {shape} is not valid; dimensions are non-negative integers "
            f"(one may be -1: whatever the data holds)"
        )
    values = split_bytes(inp._raw_data, inp.name) if inp._raw_data is not None else _flatten(inp.data)
    known = math.prod(d for d in shape if d != -1)
    # -1 is accepted (as by numpy's reshape) because the TorchServe-on-KServe runtime sends [-1].
    fits = len(values) % known == 0 if -1 in shape and known else len(values) == known
    if not fits:
        holds = "a multiple of " + str(known) if -1 in shape else str(known)
        raise InvalidInput(
            f"input {inp.name}: shape {shape} holds {holds} element{'s' * (holds != '1')} "
            f"but data has {len(values)}"
        )
    return values


def _flatten(data: Any) -> list:
    if data is None:
        return []
    if isinstance(data, (list, tuple)):
        return [x for item in data for x in _flatten(item)]
    return [data]


def split_bytes(raw: bytes, name: str) -> list[bytes]:
    """Elements of a serialized BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name}: binary data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(
                f"input {name}: binary data is cut short: an element of {length} bytes has {len(raw) - offset} left"
            )
        out.append(bytes(raw[offset : offset + length]))
        offset += length
    return out


def decode_binary_request(body: bytes, json_length: int, model_name: str) -> InferRequest:
    """A REST request using the binary data extension (JSON header, then the tensors' bytes).

    Replaces KServe's ``InferRequest.from_bytes``, which UTF-8-decodes every BYTES element (so an
    image's bytes fail with a 500) and reshapes without checking the shape (a 500 too). Here
    BYTES elements stay ``bytes`` and shapes are checked later, by :func:`elements`.
    """
    if not 0 <= json_length <= len(body):
        raise InvalidInput(f"inference-header-content-length: {json_length} is outside the body ({len(body)} bytes)")
    try:
        head = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request: the JSON header is not valid JSON: {exc}") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise InvalidInput("inputs: the JSON header must be an object with a list of inputs")
    if not isinstance(head.get("parameters") or {}, dict):
        raise InvalidInput("parameters: must be an object")
    inputs, offset = [], json_length
    for i, spec in enumerate(head["inputs"]):
        if not isinstance(spec, dict) or not all(isinstance(spec.get(k), t) for k, t in
                                                  (("name", str), ("shape", list), ("datatype", str))):
            raise InvalidInput(f"inputs[{i}]: needs a name (string), shape (list) and datatype (string)")
        params = spec.get("parameters") or None
        if params is not None and not isinstance(params, dict):
            raise InvalidInput(f"input {spec['name']}: parameters must be an object")
        inp = InferInput(spec["name"], spec["shape"], spec["datatype"], parameters=params)
        size = (params or {}).get("binary_data_size")
        if "data" in spec:
            inp.data = spec["data"]
        elif size is not None:
            if type(size) is not int or size < 0 or offset + size > len(body):
                raise InvalidInput(f"input {inp.name}: binary_data_size {size!r} runs past the end of the body")
            chunk, offset = body[offset : offset + size], offset + size
            if inp.datatype == "BYTES":
                inp.data = split_bytes(chunk, inp.name)
            else:
                inp._raw_data = chunk  # only BYTES inputs are served: the parser names the datatype
        else:
            raise InvalidInput(f"input {inp.name}: has neither data nor a binary_data_size parameter")
        inputs.append(inp)
    outputs = head.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, dict) and "name" in o for o in outputs)):
        raise InvalidInput("outputs: must be a list of objects with a name")
    return InferRequest(
        model_name=model_name,
        request_id=head.get("id"),
        parameters=head.get("parameters"),
        infer_inputs=inputs,
        request_outputs=[RequestedOutput(o["name"], o.get("parameters")) for o in outputs] if outputs else None,
    )
