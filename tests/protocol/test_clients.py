"""Real third-party clients against a real server: the openai SDK, tritonclient (HTTP and gRPC),
KServe's REST client, the sdserve CLI, and the README's curl commands as written."""

import asyncio
import base64
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from helpers.readme import example_inputs, readme_blocks, run_block
from sdserve.protocol.image_encoding import read_metadata


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def openai_client(sdxl_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{sdxl_server.url}/openai/v1", api_key="not-checked", max_retries=0, timeout=120)


def test_openai_sdk_images_generate(openai_client):
    result = openai_client.images.generate(
        model="sdxl", prompt="a lighthouse at dusk", n=2, size="320x256", response_format="b64_json",
        output_format="png", user="someone",
        extra_body={"seed": 31, "num_inference_steps": 4, "negative_prompt": "fog", "scheduler": "Euler a"},
    )
    assert len(result.data) == 2 and result.created > 0 and result.size == "320x256"
    first = base64.b64decode(result.data[0].b64_json)
    assert png_array(first).shape == (256, 320, 3)
    assert [d.model_extra["seed"] for d in result.data] == [31, 32]
    meta = read_metadata(first)
    assert meta["negative_prompt"] == "fog" and meta["scheduler"] == "Euler a" and meta["seed"] == 31


def test_openai_quality_maps_to_steps_and_format_to_encoding(openai_client):
    low = openai_client.images.generate(prompt="x", quality="low", output_format="webp", size="256x256",
                                        extra_body={"seed": 1, "refiner": "none"})
    data = base64.b64decode(low.data[0].b64_json)
    assert Image.open(io.BytesIO(data)).format == "WEBP" and low.output_format == "webp"
    # the default here is 50 steps (the pipeline's); low is half of it
    ref = openai_client.images.generate(prompt="x", size="256x256", output_format="webp",
                                        extra_body={"seed": 1, "refiner": "none", "num_inference_steps": 25})
    assert base64.b64decode(ref.data[0].b64_json) == data


def test_openai_errors_have_openai_shape(openai_client, sdxl_server):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        openai_client.images.generate(prompt="x", response_format="url")
    assert err.value.status_code == 400 and "use 'b64_json'" in err.value.message
    assert err.value.body["param"] == "response_format" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="size: must be 'WIDTHxHEIGHT'"):
        openai_client.images.generate(prompt="x", size="big")
    with pytest.raises(openai.BadRequestError, match=r"num_inference_steps: must be an integer from 1 to 100"):
        openai_client.images.generate(prompt="x", extra_body={"num_inference_steps": 1000})
    with pytest.raises(openai.NotFoundError, match="model 'dall-e-3' is not served here"):
        openai_client.images.generate(model="dall-e-3", prompt="x")
    assert [m.id for m in openai_client.models.list()] == ["sdxl"]


def test_tritonclient_http_binary_both_ways(sdxl_server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(sdxl_server.url.removeprefix("http://"), network_timeout=120)
    prompts = np.array(["a red barn", "a blue barn"], dtype=object)
    text = httpclient.InferInput("prompt", [2], "BYTES")
    text.set_data_from_numpy(prompts, binary_data=True)  # binary request body
    outputs = [httpclient.InferRequestedOutput("image", binary_data=True), httpclient.InferRequestedOutput("seed")]
    result = client.infer("sdxl", [text], outputs=outputs, request_id="tc-1",
                          parameters={"num_inference_steps": 4, "seed": 8, "guidance_scale": 6.5})
    images = result.as_numpy("image")
    assert result.get_response()["id"] == "tc-1"
    assert png_array(images[0]).shape == (256, 256, 3) and result.as_numpy("seed").tolist() == [8, 8]
    assert read_metadata(images[1])["prompt"] == "a blue barn"


TRITON_GRPC_SCRIPT = textwrap.dedent(
    """
    # Runs in its own process: tritonclient's gRPC stubs and KServe's share proto names.
    import io, json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    from PIL import Image

    client = grpcclient.InferenceServerClient(sys.argv[1])
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array(["a windmill"], dtype=object))
    params = {"num_inference_steps": 4, "seed": 17, "guidance_scale": 6.5, "scheduler": "DDIM"}
    result = client.infer("sdxl", [prompt], parameters=params, request_id="grpc-7", client_timeout=120)
    image = result.as_numpy("image")[0]
    print(json.dumps({
        "id": result.get_response().id,
        "size": Image.open(io.BytesIO(image)).size,
        "seed": result.as_numpy("seed").tolist(),
        "ready": client.is_model_ready("sdxl"),
        "inputs": [i.name for i in client.get_model_metadata("sdxl").inputs],
    }))
    """
)


def test_tritonclient_grpc(sdxl_server, tmp_path):
    script = tmp_path / "triton_grpc.py"
    script.write_text(TRITON_GRPC_SCRIPT)
    run = subprocess.run([sys.executable, str(script), sdxl_server.grpc_target], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out == {"id": "grpc-7", "size": [256, 256], "seed": [17], "ready": True,
                   "inputs": ["prompt", "negative_prompt", "image", "mask", "control_image"]}


def test_kserve_rest_client_v2(sdxl_server):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        prompt = InferInput("prompt", [1], "BYTES", data=["a quiet harbour"])
        request = InferRequest(model_name="sdxl", infer_inputs=[prompt], request_id="ks-1",
                               parameters={"num_inference_steps": 4, "seed": 2})
        try:
            return await client.infer(sdxl_server.url, request, model_name="sdxl")
        finally:
            await client.close()

    response = asyncio.run(call())
    assert response.id == "ks-1"
    assert png_array(base64.b64decode(response.outputs[0].data[0])).shape == (256, 256, 3)


def test_png_metadata_reproduces_the_image(sdxl_server):
    first = sdxl_server.predict({"instances": [{"prompt": "a tower", "num_inference_steps": 4, "num_images": 2,
                                                "negative_prompt": "rain", "scheduler": "UniPC"}]}).json()
    second_image = base64.b64decode(first["predictions"][0]["images"][1]["b64"])
    meta = read_metadata(second_image)
    assert meta["seed"] == first["predictions"][0]["images"][1]["seed"] and meta["model"] == "sdxl"
    again = sdxl_server.predict({"instances": [{k: v for k, v in meta.items() if k != "model"}]}).json()
    alone = png_array(base64.b64decode(again["predictions"][0]["image"]["b64"])).astype(int)
    # generated alone rather than second in a batch of two: equal up to batched-kernel rounding
    assert np.abs(alone - png_array(second_image).astype(int)).max() <= 2
    assert "Negative prompt: rain" in Image.open(io.BytesIO(second_image)).text["parameters"]


@pytest.mark.parametrize("api", ["v1", "openai"])
def test_cli_generate_against_a_server(sdxl_server, tmp_path, api):
    out = tmp_path / "cli.png"
    run = subprocess.run(
        [sys.executable, "-m", "sdserve", "generate", "a tiny house", "-o", str(out), "--url", sdxl_server.url,
         "--api", api, "--steps", "4", "--num_images", "2", "--seed", "40", "--width", "128"],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    files = sorted(tmp_path.glob("cli-*.png"))
    assert [f.name for f in files] == ["cli-40.png", "cli-41.png"]
    assert png_array(files[0].read_bytes()).shape == (256, 128, 3)
    assert "wrote" in run.stdout and read_metadata(files[1].read_bytes())["seed"] == 41


@pytest.mark.slow
def test_cli_generate_locally_with_a_progress_bar(models, tmp_path):
    out = tmp_path / "local.png"
    run = subprocess.run(
        [sys.executable, "-m", "sdserve", "generate", "a tiny house", "-o", str(out), "--model_dir",
         str(models["sdxl"]), "--steps", "3", "--seed", "40", "--width", "128"],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    assert "100%" in run.stderr  # the pipeline's progress bar
    assert read_metadata(out.read_bytes())["seed"] == 40 and png_array(out.read_bytes()).shape == (256, 128, 3)
    bad = subprocess.run([sys.executable, "-m", "sdserve", "generate", "x", "--model_dir", str(models["sdxl"]),
                          "--width", "100"], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1 and "width: must be a multiple of 8" in bad.stderr


def test_readme_curl_commands_work_as_written(sdxl_server, tmp_path):
    blocks = readme_blocks("bash", "curl -s localhost:8080")
    example_inputs(tmp_path)
    assert len(blocks) >= 3
    for block in blocks:
        run = run_block("bash", block, sdxl_server, tmp_path)
        assert run.returncode == 0, f"{block}\n{run.stderr}"
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(png_array(p.read_bytes()).ndim == 3 for p in pngs)


def test_readme_python_examples_work_as_written(sdxl_server, tmp_path):
    blocks = readme_blocks("python", "localhost:808")
    assert any("OpenAI(" in b for b in blocks) and any("tritonclient" in b for b in blocks)
    example_inputs(tmp_path)
    for block in blocks:
        run = run_block("python", block, sdxl_server, tmp_path)
        assert run.returncode == 0, f"{block}\n{run.stderr}"
