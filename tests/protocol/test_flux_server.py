"""FLUX.1 through a real server: v1, v2 and the ``openai`` SDK give one image for one request, true
CFG and previews work, FLUX.1 Fill serves OpenAI edits, fields FLUX would ignore are a 400 naming
the field in each protocol's error shape, and the README's FLUX.1, Fill and SD3.5 examples run as
written."""

import base64
import json

import httpx
import numpy as np
import openai
import pytest

from helpers.images import b64_image, decode_png, make_image, make_mask
from helpers.openai_stream import FAST as STREAM_FAST
from helpers.openai_stream import check_image_events, png_file, rgba_mask
from helpers.readme import example_inputs, readme_blocks, run_block
from sdserve.protocol.image_encoding import read_metadata

FAST = {"seed": 5, "num_inference_steps": 3}
SIZE = {"width": 128, "height": 128}


@pytest.fixture(scope="module")
def server(models, start_server):
    return start_server("--model_dir", str(models["flux"]), model_name="flux")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="not-checked", max_retries=0, timeout=120)


def test_v1_v2_and_openai_give_the_same_image(server, client):
    r = server.predict({"instances": [{"prompt": "a lighthouse", **FAST, **SIZE}]})
    assert r.status_code == 200, r.text
    prediction = r.json()["predictions"][0]
    params = prediction["parameters"]
    assert params["guidance_scale"] == 3.5 and params["num_inference_steps"] == 3 and "true_cfg_scale" not in params
    v2 = server.infer({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a lighthouse"]}],
                       "parameters": {**FAST, **SIZE}})
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][0]["data"][0] == prediction["image"]["b64"]
    result = client.images.generate(prompt="a lighthouse", size="128x128", extra_body=FAST)
    assert np.array_equal(decode_png(result.data[0].b64_json), decode_png(prediction["image"]["b64"]))
    info = httpx.get(f"{server.url}/v1/models/flux").json()
    assert info["pipeline"] == "FluxPipeline"


def test_true_cfg_with_a_negative_prompt(server):
    plain = server.predict({"instances": [{"prompt": "a lighthouse", **FAST, **SIZE}]}).json()
    r = server.predict({"instances": [{"prompt": "a lighthouse", "negative_prompt": "fog", "true_cfg_scale": 4,
                                       **FAST, **SIZE}]})
    assert r.status_code == 200, r.text
    prediction = r.json()["predictions"][0]
    assert prediction["parameters"]["true_cfg_scale"] == 4.0
    assert read_metadata(base64.b64decode(prediction["image"]["b64"]))["negative_prompt"] == "fog"
    assert prediction["image"]["b64"] != plain["predictions"][0]["image"]["b64"]


@pytest.mark.parametrize("values, message", [
    ({"negative_prompt": "fog"}, "instances[0].negative_prompt: FLUX reads a negative prompt only with true CFG"),
    ({"refiner": "ensemble"}, "instances[0].refiner"),
    ({"true_cfg_scale": 3}, "instances[0].true_cfg_scale: true CFG needs a negative_prompt"),
])
def test_fields_flux_would_ignore_are_a_400(server, client, values, message):
    r = server.predict({"instances": [{"prompt": "a lighthouse", **values}]})
    assert r.status_code == 400 and message in r.json()["error"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a lighthouse", size="128x128", extra_body=values)
    assert message.removeprefix("instances[0].") in caught.value.message
    r = server.predict({"instances": [{"prompt": "a lighthouse", "width": 120}]})
    assert r.status_code == 400 and "instances[0].width" in r.json()["error"] and "multiple of 16" in r.json()["error"]
    assert server.predict({"instances": [{"prompt": "still serving", **FAST, **SIZE}]}).status_code == 200


def test_streamed_previews_of_flux_latents(client):
    events = list(client.images.generate(prompt="a lighthouse", n=2, size="128x128", stream=True, partial_images=2,
                                         extra_body=STREAM_FAST))
    completed = check_image_events(events, "image_generation", n=2, partials=2)
    plain = client.images.generate(prompt="a lighthouse", n=2, size="128x128", extra_body=STREAM_FAST)
    assert [completed[i].b64_json for i in range(2)] == [d.b64_json for d in plain.data]


@pytest.fixture(scope="module")
def fill(models, start_server):
    return start_server("--model_dir", str(models["flux-fill"]), model_name="fill")


def test_flux_fill_serves_openai_edits(fill):
    client = openai.OpenAI(base_url=f"{fill.url}/openai/v1", api_key="not-checked", max_retries=0, timeout=120)
    image, mask = make_image(128, 128), make_mask(128, 128)
    result = client.images.edit(image=png_file(image), mask=png_file(rgba_mask(mask), "mask.png"), prompt="a door",
                                size="128x128", extra_body=FAST)
    meta = read_metadata(base64.b64decode(result.data[0].b64_json))
    assert meta["mode"] == "inpaint" and meta["guidance_scale"] == 30.0  # FluxFillPipeline's default
    v1 = fill.predict({"instances": [{"prompt": "a door", "image": b64_image(image), "mask": b64_image(mask), **FAST}]})
    assert np.array_equal(decode_png(v1.json()["predictions"][0]["image"]["b64"]), decode_png(result.data[0].b64_json))
    with pytest.raises(openai.BadRequestError, match="mask"):  # an inpainting model: every request brings a mask
        client.images.edit(image=png_file(image), prompt="a door", size="128x128", extra_body=FAST)


@pytest.mark.parametrize("kind, language, must_contain", [
    ("FLUX.1", "bash", "curl"), ("FLUX.1", "python", "OpenAI("), ("FLUX.1 Fill", "python", "OpenAI("),
    ("SD3.5", "bash", "curl")])
def test_readme_examples_for_these_families_work_as_written(request, models, start_server, kind, language,
                                                             must_contain, tmp_path):
    servers = {"FLUX.1": lambda: request.getfixturevalue("server"),
               "FLUX.1 Fill": lambda: request.getfixturevalue("fill"),
               "SD3.5": lambda: start_server("--model_dir", str(models["sd35"]), model_name="sd35")}
    blocks = readme_blocks(language, must_contain, server=kind)
    assert blocks, kind
    example_inputs(tmp_path)
    for block in blocks:
        run = run_block(language, block, servers[kind](), tmp_path)
        assert run.returncode == 0, f"{block}\n{run.stderr}"
        for out in tmp_path.glob("*.json"):
            assert "predictions" in json.loads(out.read_text()), out.read_text()[:300]
