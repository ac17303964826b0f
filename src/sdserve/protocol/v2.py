"""Open Inference Protocol v2 (REST ``/v2/models/<name>/infer`` and KServe's gRPC service).

Inputs: BYTES ``prompt`` of shape [N] (a lone BYTES input of any name, e.g. ``input0``, is the
prompt) and optional BYTES ``negative_prompt``, ``image`` and ``mask``, each [1] (for every prompt)
or [N]; images are encoded files (base64 in JSON, raw bytes in binary data and gRPC); see
v2_inputs.py. Generation parameters come from the request's ``parameters``; ``image`` and ``mask``
are refused there.

Outputs: ``image`` (BYTES: base64 PNG in JSON, raw bytes over gRPC or when binary output is asked
for) and ``seed`` (INT64); with ``"output_format": "tensor"`` the image output is instead one UINT8
tensor [N, H, W, 3].
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import RequestedOutput

from ..request.fields import ALIASES
from ..request.types import GenerationRequest, GenerationResult
from ..request.validation import RequestParser
from .image_encoding import b64, encode_image
from .v2_inputs import CONTROL_IMAGE, IMAGE, MASK, NEGATIVE_PROMPT, PROMPT, decode_binary_request, read_inputs

OUTPUT_FORMATS = ("image", "tensor")
OUTPUTS = ("image", "seed")
# Triton's Stable Diffusion tutorial asks for its image tensor under this name.
TENSOR_OUTPUT_ALIAS = "generated_image"

INPUT_METADATA = [
    {"name": PROMPT, "datatype": "BYTES", "shape": [-1]},
    {"name": NEGATIVE_PROMPT, "datatype": "BYTES", "shape": [-1]},
    {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
    {"name": MASK, "datatype": "BYTES", "shape": [-1]},
    {"name": CONTROL_IMAGE, "datatype": "BYTES", "shape": [-1]},
]
OUTPUT_METADATA = [
    {"name": "image", "datatype": "BYTES", "shape": [-1]},
    {"name": "seed", "datatype": "INT64", "shape": [-1]},
]


def install_binary_decoder() -> None:
    """Make KServe's v2 REST route read binary-data bodies with :func:`decode_binary_request`:
    its own decoder turns image bytes into a 500. KServe's route calls the class method by name,
    so replacing it is the one way in short of re-implementing the route."""
    InferRequest.from_bytes = classmethod(lambda cls, body, json_length, model_name:
                                          decode_binary_request(body, json_length, model_name))


@dataclass
class V2Call:
    """A parsed v2 request: what to generate and how the answer must be shaped."""

    requests: list[GenerationRequest]
    output_format: str
    request_id: str
    requested: list[RequestedOutput] | None
    binary: bool  # image bytes raw (gRPC, binary extension) rather than base64 text
    raw_outputs: bool  # all outputs in the binary section (REST) / raw_output_contents (gRPC)


def grpc_parameter_value(param: Any) -> Any:
    """Python value of a gRPC ``InferParameter``.

    KServe's proto knows bool/int64/string; Triton's clients also send ``double_param`` (field 4)
    and ``uint64_param`` (field 5), which arrive as unknown fields and are decoded here.
    """
    choice = param.WhichOneof("parameter_choice")
    if choice is not None:
        return getattr(param, choice)
    from google.protobuf.unknown_fields import UnknownFieldSet

    for f in UnknownFieldSet(param):
        if f.field_number == 4 and f.wire_type == 1:
            return struct.unpack("<d", struct.pack("<Q", f.data))[0]
        if f.field_number == 5 and f.wire_type == 0:
            return f.data
    return None


def plain_parameters(parameters: Any) -> dict[str, Any]:
    """REST JSON parameters or gRPC ``InferParameter`` map -> plain dict."""
    if not parameters:
        return {}
    return {
        key: value if isinstance(value, (str, int, float, bool, list, dict)) else grpc_parameter_value(value)
        for key, value in parameters.items()
    }


def parse_v2(request: InferRequest, parser: RequestParser, request_id: str) -> V2Call:
    params = plain_parameters(request.parameters)
    output_format = params.pop("output_format", "image")
    if output_format not in OUTPUT_FORMATS:
        raise InvalidInput(f"output_format: must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    binary_default = bool(params.pop("binary_data_output", False))
    requested = None
    if request.request_outputs:
        requested = []
        for out in request.request_outputs:
            if out.name == TENSOR_OUTPUT_ALIAS:
                output_format = "tensor"
            elif out.name not in OUTPUTS:
                raise InvalidInput(
                    f"outputs: unknown output {out.name!r}; available: {', '.join(OUTPUTS)} "
                    f"(or {TENSOR_OUTPUT_ALIAS} for the image tensor)"
                )
            binary = out.binary_data if out.binary_data is not None else binary_default
            requested.append(RequestedOutput(out.name, {**(out.parameters or {}), "binary_data": bool(binary)}))
    if NEGATIVE_PROMPT in params and any(i.name == NEGATIVE_PROMPT for i in request.inputs):
        raise InvalidInput(f"{NEGATIVE_PROMPT}: given both as an input and as a parameter")
    for key in params:
        if ALIASES.get(key, key) in (IMAGE, MASK):
            raise InvalidInput(
                f"{key}: send images as a BYTES input named '{ALIASES.get(key, key)}' (base64 text in JSON, "
                f"raw bytes in binary data or gRPC), not as a parameter"
            )
    parser.check_fields(params)
    given = read_inputs(request.inputs, parser.limits.max_input_pixels)
    if given.control_images is not None:
        params = {**params, "controls": with_control_images(params.get("controls"), given.control_images)}
    requests = []
    for i, prompt in enumerate(given.prompts):
        values = {**params, PROMPT: prompt}
        for name, per_prompt in ((NEGATIVE_PROMPT, given.negatives), (IMAGE, given.images), (MASK, given.masks)):
            if per_prompt is not None:
                values[name] = per_prompt[i]
        requests.append(parser.parse(values))
    parser.check_total_images(requests, PROMPT)
    image_binary = request.from_grpc or (
        any(o.name == "image" and o.binary_data for o in requested) if requested else binary_default
    )
    # gRPC forbids mixing raw_output_contents with typed contents: a raw tensor makes all raw.
    raw_outputs = request.use_binary_outputs or (request.from_grpc and output_format == "tensor")
    return V2Call(requests, output_format, request.id or request_id, requested, image_binary, raw_outputs)


def with_control_images(controls: Any, images: list) -> list:
    """The controls parameter (JSON text) with the control_image input's images, one per control."""
    try:
        items = json.loads(controls) if isinstance(controls, (str, bytes)) else controls
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise InvalidInput(f"input {CONTROL_IMAGE}: needs the controls parameter, a JSON list of "
                           f'{{"model": ..., "scale": ...}} objects, one per image')
    if len(items) != len(images):
        raise InvalidInput(f"input {CONTROL_IMAGE}: has {len(images)} images for {len(items)} controls; give one "
                           f"per control, in the order of the controls parameter")
    for i, item in enumerate(items):
        if "image" in item:
            raise InvalidInput(f"controls[{i}].image: given both inline and as input {CONTROL_IMAGE}; give it once")
    return [{**item, "image": image} for item, image in zip(items, images)]


def encode_response(
    call: V2Call, results: list[GenerationResult], model_name: str, warnings: list[str] | None = None,
    prompt_tokens: list[dict[str, int]] | None = None,
) -> InferResponse:
    """Build the v2 response (runs image encoding: call it off the event loop)."""
    images = [(img, r, seed) for r, res in zip(call.requests, results) for img, seed in zip(res.images, res.seeds)]
    n = len(images)
    if call.output_format == "tensor":
        stacked = np.stack([img for img, _, _ in images])
        names = [o.name for o in call.requested or []]
        name = TENSOR_OUTPUT_ALIAS if TENSOR_OUTPUT_ALIAS in names else "image"
        image_output = InferOutput(name, list(stacked.shape), "UINT8", data=stacked)
    else:
        encoded = [
            encode_image(img, r.image_format, r.quality, r.image_parameters(seed, model_name)) for img, r, seed in images
        ]
        data = encoded if call.binary else [b64(e) for e in encoded]
        image_output = InferOutput("image", [n], "BYTES", data=data)
    seed_output = InferOutput("seed", [n], "INT64", data=[s for res in results for s in res.seeds])
    outputs = [image_output, seed_output]
    if call.raw_outputs:
        # Serialise here: KServe's to_grpc cannot take numpy data when all outputs go raw.
        for out in outputs:
            dtype = {"BYTES": np.object_, "INT64": np.int64, "UINT8": np.uint8}[out.datatype]
            out.set_data_from_numpy(np.asarray(out.data, dtype=dtype), binary_data=True)
    return InferResponse(
        response_id=call.request_id or str(uuid.uuid4()),
        model_name=model_name,
        infer_outputs=outputs,
        use_binary_outputs=call.raw_outputs,
        requested_outputs=call.requested,
        parameters=_parameters(warnings, prompt_tokens),
    )


def _parameters(warnings: list[str] | None, prompt_tokens: list[dict[str, int]] | None) -> dict[str, str] | None:
    """Response parameters (scalars): the warnings, and per prompt the tokens each text encoder
    read, as JSON text (one object per prompt of the request)."""
    out = {}
    if warnings:
        out["warnings"] = "; ".join(warnings)
    if prompt_tokens and any(prompt_tokens):
        out["prompt_tokens"] = json.dumps(prompt_tokens)
    return out or None
