"""Open Inference Protocol v2 against a real server: REST JSON, binary, tensors, and gRPC."""

import asyncio
import base64
import io
import struct

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferInput, InferRequest
from kserve.inference_client import InferenceGRPCClient
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from PIL import Image

from sdserve.protocol.v2 import grpc_parameter_value

FAST = {"num_inference_steps": 4}


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_seed_runtime_request_as_written(sdxl_server):
    """The TorchServe-on-KServe runtime's v2 request, byte for byte."""
    payload = {"id": "42", "inputs": [{"name": "input0", "shape": [-1], "datatype": "BYTES", "data": ["Photo of a dog"]}]}
    r = sdxl_server.infer(payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "42" and body["model_name"] == "sdxl"
    image, seed = body["outputs"]
    assert (image["name"], image["datatype"], image["shape"]) == ("image", "BYTES", [1])
    assert png(base64.b64decode(image["data"][0])).shape == (256, 256, 3)
    assert (seed["name"], seed["datatype"], seed["shape"]) == ("seed", "INT64", [1]) and seed["data"][0] >= 0


def test_tensor_output_rebuilds_the_image(sdxl_server):
    payload = {
        "inputs": [{"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["a dog", "a cat"]}],
        "parameters": {**FAST, "seed": 5, "output_format": "tensor"},
    }
    body = sdxl_server.infer(payload).json()
    image, seed = body["outputs"]
    assert (image["datatype"], image["shape"]) == ("UINT8", [2, 256, 256, 3]) and seed["data"] == [5, 5]
    tensor = np.array(image["data"], dtype=np.uint8).reshape(image["shape"])
    # same seed and settings as the PNG path: same pixels
    as_png = sdxl_server.infer({**payload, "parameters": {**FAST, "seed": 5}}).json()["outputs"][0]["data"]
    assert np.array_equal(tensor[0], png(base64.b64decode(as_png[0])))


def test_parameters_negative_prompt_and_several_images(sdxl_server):
    payload = {
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a castle"]},
            {"name": "negative_prompt", "shape": [1], "datatype": "BYTES", "data": ["fog"]},
        ],
        "parameters": {**FAST, "num_images": 3, "seed": 10, "scheduler": "Euler a", "refiner": "refine",
                       "refiner_strength": 0.5, "crops_coords_top_left": "[0, 64]", "guidance_scale": 6.5},
    }
    body = sdxl_server.infer(payload).json()
    assert body["outputs"][0]["shape"] == [3] and body["outputs"][1]["data"] == [10, 11, 12]
    without = sdxl_server.infer({"inputs": payload["inputs"][:1], "parameters": payload["parameters"]}).json()
    assert without["outputs"][0]["data"][0] != body["outputs"][0]["data"][0]


def test_binary_output_extension(sdxl_server):
    payload = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a tree"]}],
               "parameters": {**FAST, "seed": 3, "binary_data_output": True}}
    r = sdxl_server.infer(payload)
    assert r.status_code == 200
    import tritonclient.http as httpclient

    result = httpclient.InferenceServerClient.parse_response_body(
        r.content, header_length=int(r.headers["inference-header-content-length"])
    )
    assert png(result.as_numpy("image")[0]).shape == (256, 256, 3) and result.as_numpy("seed").tolist() == [3]


def test_tritonclient_http_with_the_triton_tutorial_shapes(sdxl_server):
    """Triton's Stable Diffusion tutorial client: prompt [1, 1], asks for 'generated_image'."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(sdxl_server.url.removeprefix("http://"), network_timeout=120)
    prompt = np.array(["a lighthouse"], dtype=object).reshape((-1, 1))
    text = httpclient.InferInput("prompt", prompt.shape, "BYTES")
    text.set_data_from_numpy(prompt)
    result = client.infer("sdxl", [text], outputs=[httpclient.InferRequestedOutput("generated_image")],
                          parameters={"num_inference_steps": 4, "seed": 1})
    image = result.as_numpy("generated_image")
    assert image.shape == (1, 256, 256, 3) and image.dtype == np.uint8
    Image.fromarray(np.squeeze(image))  # what the tutorial client does next
    assert client.is_model_ready("sdxl")
    metadata = client.get_model_metadata("sdxl")
    assert [i["name"] for i in metadata["inputs"]] == ["prompt", "negative_prompt", "image", "mask", "control_image"]
    assert [o["name"] for o in metadata["outputs"]] == ["image", "seed"]


BAD_V2 = [
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "INT32", "data": [1]}]}, "input prompt: datatype must be BYTES"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                 {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["y"]}]}, "inputs: expected a BYTES input 'prompt'"),
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "parameters": {"stepz": 4}}, "stepz: unknown field"),
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "parameters": {"num_inference_steps": 0}}, "num_inference_steps: must be an integer from 1 to 100"),
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "parameters": {"output_format": "gif"}}, "output_format: must be one of image, tensor"),
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "outputs": [{"name": "latents"}]}, "outputs: unknown output 'latents'"),
    ({"inputs": [{"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["x", "y"]},
                 {"name": "negative_prompt", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]}]},
     "input negative_prompt: has 3 entries; give 1 or one per prompt (2)"),
    ({"inputs": [{"name": "prompt", "shape": [0], "datatype": "BYTES", "data": []}]}, "input prompt: no prompt given"),
]


@pytest.mark.parametrize("payload, message", BAD_V2)
def test_bad_v2_input_is_a_400_naming_the_problem(sdxl_server, payload, message):
    r = sdxl_server.infer(payload)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def grpc_client(server) -> InferenceGRPCClient:
    limit = 64 * 1024 * 1024
    return InferenceGRPCClient(
        server.grpc_target, timeout=120,
        channel_args=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )


def grpc_request(prompts, parameters, request_id="g1", raw=False) -> InferRequest:
    """``raw``: send the prompt in raw_input_contents (then the answer comes raw too)."""
    prompt = InferInput("prompt", [len(prompts)], "BYTES")
    prompt.set_data_from_numpy(np.array(prompts, dtype=object), binary_data=raw)
    return InferRequest(model_name="sdxl", infer_inputs=[prompt], request_id=request_id, parameters=parameters)


@pytest.mark.parametrize("raw", [False, True], ids=["typed-contents", "raw-contents"])
def test_grpc_infer_with_typed_parameters(sdxl_server, raw):
    async def call():
        client = grpc_client(sdxl_server)
        try:
            params = {"num_inference_steps": pb.InferParameter(int64_param=4),
                      "guidance_scale": pb.InferParameter(string_param="6.5"),
                      "seed": pb.InferParameter(int64_param=21),
                      "refiner": pb.InferParameter(bool_param=False)}
            return await client.infer(grpc_request(["a dog"], params, raw=raw))
        finally:
            await client.close()

    response = asyncio.run(call())
    assert response.id == "g1"
    image, seed = response.outputs
    assert image.name == "image" and image.datatype == "BYTES"
    image_bytes = image.as_numpy()[0] if raw else image.data[0]
    assert png(image_bytes).shape == (256, 256, 3)  # PNG bytes over gRPC, no base64
    assert (seed.as_numpy().tolist() if raw else seed.data) == [21]
    # the same image as over REST with the same settings
    rest = sdxl_server.infer({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a dog"]}],
                              "parameters": {**FAST, "guidance_scale": 6.5, "seed": 21, "refiner": "none"}}).json()
    assert base64.b64decode(rest["outputs"][0]["data"][0]) == image_bytes


def test_grpc_carries_images_beyond_the_8_mib_default(sdxl_server):
    async def call():
        client = grpc_client(sdxl_server)
        try:
            params = {"num_inference_steps": pb.InferParameter(int64_param=2),
                      "width": pb.InferParameter(int64_param=1024), "height": pb.InferParameter(int64_param=1024),
                      "num_images": pb.InferParameter(int64_param=3), "refiner": pb.InferParameter(string_param="none"),
                      "output_format": pb.InferParameter(string_param="tensor")}
            return await client.infer(grpc_request(["a big field"], params))
        finally:
            await client.close()

    response = asyncio.run(call())
    tensor = response.outputs[0].as_numpy()
    assert tensor.shape == (3, 1024, 1024, 3) and tensor.nbytes > 8 * 1024 * 1024


def test_grpc_invalid_argument_names_the_field(sdxl_server):
    async def call():
        client = grpc_client(sdxl_server)
        try:
            return await client.infer(grpc_request(["x"], {"width": pb.InferParameter(int64_param=100)}))
        finally:
            await client.close()

    with pytest.raises(grpc.RpcError) as err:
        asyncio.run(call())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "width: must be a multiple of 8" in err.value.details()


def test_triton_double_and_uint64_parameters_are_decoded():
    """Triton's clients send floats as double_param (field 4), which KServe's proto lacks."""
    double = pb.InferParameter.FromString(b"\x21" + struct.pack("<d", 7.5))
    uint64 = pb.InferParameter.FromString(b"\x28\x05")
    assert grpc_parameter_value(double) == 7.5 and grpc_parameter_value(uint64) == 5
    assert grpc_parameter_value(pb.InferParameter(string_param="x")) == "x"


def test_v2_model_metadata_and_health(sdxl_server):
    meta = httpx.get(f"{sdxl_server.url}/v2/models/sdxl").json()
    assert meta["inputs"][0] == {"name": "prompt", "datatype": "BYTES", "shape": [-1]}
    assert meta["outputs"][1] == {"name": "seed", "datatype": "INT64", "shape": [-1]}
    assert httpx.get(f"{sdxl_server.url}/v2/health/live").json() == {"live": True}
