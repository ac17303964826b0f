"""Control inputs through a real server: v1, AUTOMATIC1111's ControlNet request shape, v2 REST
(the control_image input), gRPC with tritonclient and the ``openai`` SDK give one image for one
request; the model metadata lists the control models, the metrics count their calls, bad controls
are a 400 naming the field in each protocol, control models in S3 are served (a new upload without
a restart), and the README's control examples run as written."""

import json
import re
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import openai
import pytest

from helpers.control_models import write_controls
from helpers.images import b64_image, decode_png, encode, make_image
from helpers.readme import example_inputs, readme_blocks, run_block
from helpers.s3 import S3_CREDENTIALS, local_s3
from sdserve.tiny import write_tiny_model

FAST = {"seed": 5, "num_inference_steps": 3, "width": 128, "height": 128}
EDGES = make_image(128, 128, seed=1)
CONTROL = {"model": "edges", "scale": 0.8, "end": 0.9}


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    folder = write_tiny_model(tmp_path_factory.mktemp("controls") / "sdxl", "sdxl")
    write_controls(folder, "sdxl", ("edges", "sketch", "style"))
    return start_server("--model_dir", str(folder), "--max_controls", "2")


@pytest.fixture(scope="module")
def reference(server):
    """The v1 answer for a prompt with one ControlNet: every other protocol must give its image."""
    r = server.predict({"instances": [{"prompt": "a lighthouse", **FAST,
                                       "controls": [{**CONTROL, "image": b64_image(EDGES)}]}]})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_v1_describes_the_controls_and_the_control_changes_the_image(server, reference):
    assert reference["parameters"]["controls"] == [{"model": "edges", "kind": "controlnet", "scale": 0.8,
                                                    "start": 0.0, "end": 0.9}]
    plain = server.predict({"instances": [{"prompt": "a lighthouse", **FAST}]}).json()["predictions"][0]
    assert np.abs(decode_png(plain["image"]["b64"]).astype(int) - decode_png(reference["image"]["b64"])).max() > 8
    info = httpx.get(f"{server.url}/v1/models/sdxl").json()
    assert info["controls"] == [{"name": "edges", "kind": "controlnet"}, {"name": "sketch", "kind": "t2i-adapter"},
                                {"name": "style", "kind": "ip-adapter"}]


def test_openai_sdk_takes_controls_in_extra_body(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="not-checked", max_retries=0, timeout=120)
    result = client.images.generate(prompt="a lighthouse", size="128x128", extra_body={
        "seed": 5, "num_inference_steps": 3, "controls": [{**CONTROL, "image": b64_image(EDGES)}]})
    assert np.array_equal(decode_png(result.data[0].b64_json), decode_png(reference["image"]["b64"]))
    styled = client.images.generate(prompt="a lighthouse", size="128x128", extra_body={
        "seed": 5, "num_inference_steps": 3, "controls": [{"model": "style", "image": b64_image(EDGES), "scale": 0.7},
                                                          {**CONTROL, "image": b64_image(EDGES)}]})
    v1 = server.predict({"instances": [{"prompt": "a lighthouse", **FAST, "controls": [
        {"model": "style", "image": b64_image(EDGES), "scale": 0.7}, {**CONTROL, "image": b64_image(EDGES)}]}]})
    styled_pixels = decode_png(styled.data[0].b64_json)
    assert np.array_equal(decode_png(v1.json()["predictions"][0]["image"]["b64"]), styled_pixels)
    assert not np.array_equal(styled_pixels, decode_png(result.data[0].b64_json))  # the IP-Adapter counts
    with pytest.raises(openai.BadRequestError, match=r"controls\[0\].model: no control model named 'nope'"):
        client.images.generate(prompt="x", size="128x128", extra_body={"controls": [{"model": "nope", "image": "x"}]})


def test_v2_rest_takes_control_images_as_an_input(server, reference):
    params = {**FAST, "controls": json.dumps([CONTROL])}
    r = server.infer({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a lighthouse"]},
                                 {"name": "control_image", "shape": [1], "datatype": "BYTES",
                                  "data": [b64_image(EDGES)]}], "parameters": params})
    assert r.status_code == 200, r.text
    assert np.array_equal(decode_png(r.json()["outputs"][0]["data"][0]), decode_png(reference["image"]["b64"]))
    two = server.infer({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                                   {"name": "control_image", "shape": [2], "datatype": "BYTES",
                                    "data": [b64_image(EDGES)] * 2}], "parameters": params})
    assert two.status_code == 400 and "input control_image: has 2 images for 1 controls" in two.json()["error"]


TRITON_GRPC_SCRIPT = textwrap.dedent(
    """
    # Runs in its own process: tritonclient's gRPC stubs and KServe's share proto names.
    import base64, json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(sys.argv[1])
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array(["a lighthouse"], dtype=object))
    control = grpcclient.InferInput("control_image", [1], "BYTES")
    control.set_data_from_numpy(np.array([open(sys.argv[2], "rb").read()], dtype=object))
    params = {**json.loads(sys.argv[3]), "controls": json.dumps([json.loads(sys.argv[4])])}
    result = client.infer("sdxl", [prompt, control], parameters=params, client_timeout=120)
    print(base64.b64encode(result.as_numpy("image")[0]).decode())
    """
)


def test_grpc_with_tritonclient_sends_the_control_image_as_raw_bytes(server, reference, tmp_path):
    (tmp_path / "triton_grpc.py").write_text(TRITON_GRPC_SCRIPT)
    (tmp_path / "edges.png").write_bytes(encode(EDGES))
    run = subprocess.run([sys.executable, str(tmp_path / "triton_grpc.py"), server.grpc_target,
                          str(tmp_path / "edges.png"), json.dumps(FAST), json.dumps(CONTROL)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert np.array_equal(decode_png(run.stdout.strip()), decode_png(reference["image"]["b64"]))


A1111_UNIT = {"enabled": True, "image": b64_image(EDGES), "module": "canny", "model": "edges [4e6c3c91]",
              "weight": 0.8, "guidance_start": 0.0, "guidance_end": 0.9, "threshold_a": 100, "threshold_b": 200,
              "resize_mode": "Crop and Resize", "processor_res": 512, "pixel_perfect": False,
              "control_mode": "Balanced", "lowvram": False}


def test_an_automatic1111_controlnet_request_works_unchanged(server):
    a1111 = {"prompt": "a lighthouse", "steps": 3, "cfg_scale": 7, "seed": 5, "width": 128, "height": 128,
             "sampler_name": "Euler a", "alwayson_scripts": {"controlnet": {"args": [A1111_UNIT, {"enabled": False}]}}}
    ours = {"prompt": "a lighthouse", "num_inference_steps": 3, "guidance_scale": 7, "seed": 5, "width": 128,
            "height": 128, "scheduler": "Euler a",
            "controls": [{**CONTROL, "image": b64_image(EDGES), "preprocessor": "canny"}]}
    answers = [server.predict({"instances": [body]}) for body in (a1111, ours)]
    assert all(r.status_code == 200 for r in answers), answers[0].text
    assert answers[0].json()["predictions"][0]["image"] == answers[1].json()["predictions"][0]["image"]


@pytest.mark.parametrize("values, message", [
    ({"controls": [{"model": "nope", "image": "x"}]}, "instances[0].controls[0].model: no control model named 'nope'; "
                                                      "available: edges, sketch, style"),
    ({"controls": [{**CONTROL, "image": "x"}] * 3}, "instances[0].controls: must be a list of at most 2 controls"),
    ({"controls": [{**CONTROL, "image": b64_image(EDGES), "scale": -1}]},
     "instances[0].controls[0].scale: must be a finite number in [0.0, 2.0], got -1"),
    ({"alwayson_scripts": {"controlnet": {"args": [{**A1111_UNIT, "module": "openpose"}]}}},
     "instances[0].alwayson_scripts.controlnet.args[0].module: 'openpose' does not run in sdserve; allowed: none, "
     "canny"),
    ({"alwayson_scripts": {"controlnet": {"args": [{**A1111_UNIT, "control_mode": "ControlNet is more important"}]}}},
     "instances[0].alwayson_scripts.controlnet.args[0].control_mode: 'ControlNet is more important' is not supported"),
    ({"alwayson_scripts": {"adetailer": {"args": []}}}, "instances[0].alwayson_scripts: only the controlnet script"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"enabled": False}, {**A1111_UNIT, "weight": 3}]}}},
     "instances[0].alwayson_scripts.controlnet.args[1].weight: must be a finite number in [0.0, 2.0], got 3"),
    ({"alwayson_scripts": {"controlnet": {"args": [{**A1111_UNIT, "model": "canny_sd15 [fef5e48e]"}]}}},
     "instances[0].alwayson_scripts.controlnet.args[0].model: no control model named 'canny_sd15'"),
])
def test_bad_controls_are_a_400_and_the_server_keeps_serving(server, values, message):
    r = server.predict({"instances": [{"prompt": "a lighthouse", **values}]})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert server.predict({"instances": [{"prompt": "still serving", **FAST}]}).status_code == 200


def test_metrics_count_control_calls(server):
    def calls() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        found = re.search(r'^sdserve_control_calls_total\{kind="controlnet"\} (\S+)', text, re.M)
        return float(found.group(1)) if found else 0.0

    before = calls()
    control = [{**CONTROL, "image": b64_image(EDGES)}]
    r = server.predict({"instances": [{"prompt": "a fox", **FAST, "controls": control}]})
    assert r.status_code == 200
    # one ControlNet call per step it applies to: end 0.9 leaves out the last of 3 steps (3/3 > 0.9)
    assert calls() - before == 2


def test_control_models_in_s3_and_a_new_upload_without_a_restart(server, reference, start_server, tmp_path):
    folder = write_tiny_model(tmp_path / "edges", "sdxl-controlnet", seed=1)  # the weights of the server's edges
    model = write_tiny_model(tmp_path / "sdxl", "sdxl")

    def upload(client, name):
        for file in folder.iterdir():
            client.upload_file(str(file), "controls", f"models/{name}/{file.name}")

    with local_s3("controls") as (endpoint, client):
        upload(client, "edges")
        remote = start_server("--model_dir", str(model), "--control_dir", "s3://controls/models/",
                              "--lora_relist_seconds", "0", "--download_dir", str(tmp_path / "cache"),
                              model_name="remote", env={**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
        assert httpx.get(f"{remote.url}/v1/models/remote").json()["controls"] == [{"name": "edges",
                                                                                   "kind": "controlnet"}]
        upload(client, "later")
        for name in ("edges", "later"):
            r = remote.predict({"instances": [{"prompt": "a lighthouse", **FAST,
                                               "controls": [{**CONTROL, "model": name, "image": b64_image(EDGES)}]}]})
            assert r.status_code == 200, r.text
            assert np.array_equal(decode_png(r.json()["predictions"][0]["image"]["b64"]),
                                  decode_png(reference["image"]["b64"]))


@pytest.mark.parametrize("language, must_contain", [("bash", "curl"), ("python", "OpenAI(")])
def test_readme_control_examples_work_as_written(server, language, must_contain, tmp_path):
    blocks = readme_blocks(language, must_contain, server="SDXL")
    assert blocks
    example_inputs(tmp_path)
    for block in blocks:
        run = run_block(language, block, server, tmp_path)
        assert run.returncode == 0, f"{block}\n{run.stderr}"
    for out in tmp_path.glob("*.json"):  # each answer holds an image
        assert "predictions" in json.loads(out.read_text()) or "outputs" in json.loads(out.read_text()), \
            out.read_text()[:300]
