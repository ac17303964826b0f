"""v2 image inputs (REST JSON, REST binary data, gRPC typed and raw contents) against a real
server, and the shape-vs-data check every v2 input gets."""

import asyncio
import base64
import io
import json
import struct

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferInput, InferRequest
from kserve.inference_client import InferenceGRPCClient
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from PIL import Image

from helpers.images import b64_image, encode, make_image, make_mask

IMAGE = make_image(128, 128, seed=1)
OTHER = make_image(128, 128, seed=2)
PNG = encode(IMAGE)
FAST = {"num_inference_steps": 4, "seed": 3}


@pytest.fixture(scope="module")
def server(models, start_server):
    return start_server("--model_dir", str(models["sdxl"]), model_name="sdxl")


def pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def text(name: str, values: list[str], shape: list[int] | None = None) -> dict:
    return {"name": name, "shape": shape or [len(values)], "datatype": "BYTES", "data": values}


def json_images(server, inputs: list[dict], **parameters) -> list[np.ndarray]:
    r = server.infer({"inputs": inputs, "parameters": {**FAST, **parameters}})
    assert r.status_code == 200, r.text
    return [pixels(d) for d in r.json()["outputs"][0]["data"]]


def grpc_call(server, inputs: list[InferInput], parameters: dict | None = None):
    async def call():
        limit = 64 * 1024 * 1024
        client = InferenceGRPCClient(server.grpc_target, timeout=120, channel_args=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
        params = {"num_inference_steps": pb.InferParameter(int64_param=4), "seed": pb.InferParameter(int64_param=3),
                  **(parameters or {})}
        try:
            return await client.infer(InferRequest(model_name="sdxl", infer_inputs=inputs, parameters=params))
        finally:
            await client.close()

    return asyncio.run(call())


def grpc_bytes(name: str, values: list, raw: bool) -> InferInput:
    """``raw``: raw_input_contents (length-prefixed bytes); else typed bytes_contents."""
    inp = InferInput(name, [len(values)], "BYTES")
    if raw:
        inp.set_data_from_numpy(np.array(values, dtype=object), binary_data=True)
    else:
        inp.data = [v.encode() if isinstance(v, str) else v for v in values]
    return inp


def test_json_prompts_share_one_image_and_mask(server):
    images = json_images(server, [text("prompt", ["a fox", "a cat"]), text("image", [b64_image(IMAGE)]),
                                  text("mask", [b64_image(make_mask(128, 128))])])
    assert [i.shape for i in images] == [(128, 128, 3)] * 2
    assert not np.array_equal(images[0], images[1])


def test_json_one_image_per_prompt_in_any_format(server):
    both = json_images(server, [text("prompt", ["a fox", "a cat"]),
                                text("image", [b64_image(IMAGE), b64_image(OTHER, "WEBP")])], strength=0.7)
    assert [i.shape for i in both] == [(128, 128, 3)] * 2
    # each prompt got its own image: the second alone gives the second's pixels
    alone = json_images(server, [text("prompt", ["a cat"]), text("image", [b64_image(OTHER, "WEBP")])], strength=0.7)
    assert np.abs(both[1].astype(int) - alone[0]).max() <= 2
    swapped = json_images(server, [text("prompt", ["a cat"]), text("image", [b64_image(IMAGE)])], strength=0.7)
    assert np.abs(both[1].astype(int) - swapped[0]).mean() > 5


def test_v1_v2_json_and_grpc_give_identical_pixels(server):
    r = server.predict({"instances": [{"prompt": "a lighthouse", "image": b64_image(IMAGE), "strength": 0.7, **FAST}]})
    assert r.status_code == 200, r.text
    v1 = pixels(r.json()["predictions"][0]["image"]["b64"])
    (v2,) = json_images(server, [text("prompt", ["a lighthouse"]), text("image", [b64_image(IMAGE)])], strength=0.7)
    strength = {"strength": pb.InferParameter(string_param="0.7")}
    typed = grpc_call(server, [grpc_bytes("prompt", ["a lighthouse"], False), grpc_bytes("image", [PNG], False)], strength)
    raw = grpc_call(server, [grpc_bytes("prompt", ["a lighthouse"], True), grpc_bytes("image", [PNG], True)], strength)
    assert v1.shape == (128, 128, 3)
    assert np.array_equal(v1, v2)
    assert np.array_equal(v1, pixels(typed.outputs[0].data[0]))
    assert np.array_equal(v1, pixels(raw.outputs[0].as_numpy()[0]))


def test_tritonclient_http_binary_image_and_mask(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    tensors = []
    for name, values in (("prompt", ["a fox", "a cat"]), ("image", [PNG]), ("mask", [encode(make_mask(128, 128))])):
        tensor = httpclient.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=True)
        tensors.append(tensor)
    result = client.infer("sdxl", tensors, parameters=FAST,
                          outputs=[httpclient.InferRequestedOutput("image", binary_data=True)])
    binary = [pixels(b) for b in result.as_numpy("image")]
    as_json = json_images(server, [text("prompt", ["a fox", "a cat"]), text("image", [b64_image(IMAGE)]),
                                   text("mask", [b64_image(make_mask(128, 128))])])
    assert all(np.array_equal(a, b) for a, b in zip(binary, as_json, strict=True))

    bad = httpclient.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"\x89PNG not really"], dtype=object), binary_data=True)
    with pytest.raises(httpclient.InferenceServerException) as err:
        client.infer("sdxl", [tensors[0], bad], parameters=FAST)
    assert err.value.status() == "400" and err.value.message().startswith("input image[0]: not a readable PNG")


def binary_body(inputs: list[tuple[str, list[int], list[bytes]]]) -> tuple[bytes, dict]:
    """A hand-made binary-data request (tritonclient refuses mismatched shapes client-side)."""
    blobs = [b"".join(struct.pack("<I", len(v)) + v for v in values) for _, _, values in inputs]
    head = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}
                                  for (name, shape, _), blob in zip(inputs, blobs)],
                       "parameters": FAST}).encode()
    headers = {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"}
    return head + b"".join(blobs), headers


@pytest.mark.parametrize("inputs, message", [
    ([("prompt", [2], [b"one"])], "input prompt: shape [2] holds 2 elements but data has 1"),
    ([("prompt", [1], [b"a"]), ("image", [1, 2], [PNG])], "input image: shape [1, 2] holds 2 elements but data has 1"),
    ([("prompt", [1], [b"a"]), ("image", [1], [b"junk"])], "input image[0]: not a readable PNG, JPEG or WebP image"),
])
def test_binary_data_errors_are_400s(server, inputs, message):
    body, headers = binary_body(inputs)
    r = httpx.post(f"{server.url}/v2/models/sdxl/infer", content=body, headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"].startswith(message), r.text
    cut = httpx.post(f"{server.url}/v2/models/sdxl/infer", content=body[:-3], headers=headers, timeout=60)
    assert cut.status_code == 400 and "binary_data_size" in cut.json()["error"], cut.text


IMG = b64_image(IMAGE)
BAD_JSON = [
    ([text("prompt", ["one"], [2])], "input prompt: shape [2] holds 2 elements but data has 1"),
    ([text("prompt", ["a", "b"]), text("negative_prompt", ["x"], [2])],
     "input negative_prompt: shape [2] holds 2 elements but data has 1"),
    ([text("prompt", ["a"]), text("image", [IMG], [2])], "input image: shape [2] holds 2 elements but data has 1"),
    ([text("prompt", ["a"]), text("mask", [IMG, IMG], [1])], "input mask: shape [1] holds 1 element but data has 2"),
    ([text("prompt", [["a"], ["b"]], [2, 2])], "input prompt: shape [2, 2] holds 4 elements but data has 2"),
    ([text("prompt", ["a"], [-2])], "input prompt: shape [-2] is not valid"),
    ([text("prompt", ["a", "b"]), text("image", [IMG] * 3)], "input image: has 3 entries; give 1 or one per prompt (2)"),
    ([text("prompt", ["a"]), text("image", ["not base64!"])], "input image[0]: not valid base64"),
    ([text("prompt", ["a"]), text("image", [base64.b64encode(b"GIF89a...").decode()])],
     "input image[0]: not a readable PNG, JPEG or WebP image"),
    ([text("prompt", ["a"]), text("image", [IMG]), text("mask", [b64_image(make_mask(64, 64))])],
     "mask: 64x64 differs from the image's size 128x128"),
    ([text("prompt", ["a"]), text("mask", [IMG])], "mask: a mask needs an image"),
    ([text("prompt", ["a"]), {"name": "image", "shape": [1], "datatype": "UINT8", "data": [1]}],
     "input image: datatype must be BYTES"),
]


@pytest.mark.parametrize("inputs, message", BAD_JSON)
def test_bad_json_inputs_are_400s_naming_the_input(server, inputs, message):
    r = server.infer({"inputs": inputs, "parameters": FAST})
    assert r.status_code == 400 and r.json()["error"].startswith(message), r.text


@pytest.mark.parametrize("key", ["image", "init_images", "mask"])
def test_image_as_a_parameter_is_refused(server, key):
    r = server.infer({"inputs": [text("prompt", ["a"])], "parameters": {**FAST, key: IMG}})
    assert r.status_code == 400 and r.json()["error"].startswith(f"{key}: send images as a BYTES input"), r.text


@pytest.mark.parametrize("raw", [False, True], ids=["typed-contents", "raw-contents"])
def test_grpc_shape_mismatch_is_invalid_argument(server, raw):
    prompt = grpc_bytes("prompt", ["one"], raw)
    prompt.shape = [2]
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(server, [prompt])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("input prompt: shape [2] holds 2 elements but data has 1")
    image = grpc_bytes("image", [PNG, PNG], raw)
    image.shape = [3]
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(server, [grpc_bytes("prompt", ["a"], raw), image])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("input image: shape [3] holds 3 elements but data has 2")
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(server, [grpc_bytes("prompt", ["a"], raw), grpc_bytes("image", [b"junk"], raw)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("input image[0]: not a readable PNG")


def test_metadata_lists_image_inputs_and_server_keeps_serving(server):
    meta = httpx.get(f"{server.url}/v2/models/sdxl").json()
    assert [i["name"] for i in meta["inputs"]] == ["prompt", "negative_prompt", "image", "mask", "control_image"]
    assert all(i == {"name": i["name"], "datatype": "BYTES", "shape": [-1]} for i in meta["inputs"])
    (image,) = json_images(server, [text("prompt", ["still here"]), text("image", [IMG])])
    assert image.shape == (128, 128, 3)
