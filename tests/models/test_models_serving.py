"""Serving other kinds of models: LoRA adapters, SD3 (with and without T5), a single-file
checkpoint and a fine-tuned (DreamBooth) pipeline folder, each through a real server or loader."""

import base64
import shutil
import time

import httpx
import pytest
import torch

from helpers.images import decode_png
from sdserve.models import loading
from sdserve.models.layout import discover
from sdserve.protocol.image_encoding import read_metadata


@pytest.fixture(scope="module")
def lora_server(models, start_server):
    return start_server("--model_dir", str(models["sdxl-loras"]), model_name="lora")


def test_adapters_are_listed(lora_server):
    v1 = httpx.get(f"{lora_server.url}/v1/models/lora").json()
    assert v1["adapters"] == ["pixel", "trex"] and v1["ready"] is True
    v2 = httpx.get(f"{lora_server.url}/v2/models/lora").json()
    assert v2["parameters"]["adapters"] == ["pixel", "trex"] and v2["inputs"][0]["name"] == "prompt"


def test_requests_pick_adapters_and_weights(lora_server):
    common = {"prompt": "a dinosaur", "seed": 5, "num_inference_steps": 3}
    plain = lora_server.predict({"instances": [common]}).json()["predictions"][0]["image"]["b64"]
    r = lora_server.predict({"instances": [{**common, "loras": [{"name": "trex", "scale": 0.8}]}]})
    assert r.status_code == 200, r.text
    image = r.json()["predictions"][0]["image"]["b64"]
    assert image != plain
    assert read_metadata(base64.b64decode(image))["loras"] == [{"name": "trex", "scale": 0.8}]
    again = lora_server.predict({"instances": [common]}).json()["predictions"][0]["image"]["b64"]
    assert again == plain  # no adapter: exactly the base model again
    v2 = lora_server.infer({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a dinosaur"]}],
                            "parameters": {"seed": 5, "num_inference_steps": 3, "loras": '[{"name": "trex", "scale": 0.8}]'}})
    assert v2.status_code == 200 and base64.b64decode(v2.json()["outputs"][0]["data"][0]) == base64.b64decode(image)


@pytest.mark.parametrize("name", ["dragon", "../loras/trex", "/etc/passwd", "trex/../pixel"])
def test_unknown_adapters_are_a_400(lora_server, name):
    r = lora_server.predict({"instances": [{"prompt": "x", "loras": [name]}]})
    error = r.json()["error"]
    assert r.status_code == 400 and "instances[0].loras[0].name: no adapter named" in error
    assert error.endswith("available: pixel, trex")


def test_a_new_adapter_needs_no_restart(models, lora_server):
    folder = models["sdxl-loras"] / "loras" / "late"
    shutil.copytree(models["sdxl-loras"] / "loras" / "pixel", folder)
    try:
        deadline = time.monotonic() + 15  # the folder is re-read at most every 5 s
        while True:
            r = lora_server.predict({"instances": [{"prompt": "x", "num_inference_steps": 2, "loras": ["late"]}]})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
        assert "late" in httpx.get(f"{lora_server.url}/v1/models/lora").json()["adapters"]
    finally:
        shutil.rmtree(folder)


@pytest.mark.slow
def test_sd3_without_t5(models, start_server):
    server = start_server("--model_dir", str(models["sd3"]), "--drop_t5", model_name="sd3")
    r = server.predict({"instances": [{"prompt": "a hill", "num_inference_steps": 3, "scheduler": "heun"}]})
    assert r.status_code == 200, r.text
    params = r.json()["predictions"][0]["parameters"]
    assert params["guidance_scale"] == 7.0 and params["scheduler"] == "Heun"
    bad = server.predict({"instances": [{"prompt": "a hill", "prompt_3": "t5"}]})
    assert bad.status_code == 400 and "the T5 encoder is not loaded" in bad.json()["error"]
    info = httpx.get(f"{server.url}/v1/models/sd3").json()
    assert info["pipeline"] == "StableDiffusion3Pipeline"


@pytest.mark.slow
def test_single_file_checkpoint_serves(models, start_server):
    server = start_server("--model_dir", str(models["sd-single-file"]), model_name="single")
    r = server.predict({"instances": [{"prompt": "a hill", "num_inference_steps": 3, "seed": 1}]})
    assert r.status_code == 200, r.text
    folder = start_server("--model_dir", str(models["sd"]), model_name="folder")
    same = folder.predict({"instances": [{"prompt": "a hill", "num_inference_steps": 3, "seed": 1}]})
    pixels = [decode_png(x.json()["predictions"][0]["image"]["b64"]) for x in (r, same)]
    assert (pixels[0] == pixels[1]).all()  # the same weights, converted from the original layout


def test_dreambooth_output_folder_serves_like_a_base_model(models, tmp_path):
    """A full fine-tune's output: the pipeline plus training leftovers (checkpoints, logs)."""
    out = tmp_path / "dreambooth-out"
    shutil.copytree(models["sdxl"], out)
    (out / "checkpoint-500").mkdir()
    (out / "checkpoint-500" / "optimizer.bin").write_bytes(b"pickle")
    (out / "logs").mkdir()
    loaded = loading.load(discover(out), torch.device("cpu"), torch.float32)
    assert loaded.capabilities.pipeline_class == "StableDiffusionXLPipeline"


@pytest.mark.slow
def test_cli_generates_with_a_lora_locally(models, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "dino.png"
    run = subprocess.run([sys.executable, "-m", "sdserve", "generate", "a dinosaur", "-o", str(out), "--model_dir",
                          str(models["sdxl-loras"]), "--steps", "2", "--lora", "trex:0.5", "--lora", "pixel"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert read_metadata(out.read_bytes())["loras"] == [{"name": "trex", "scale": 0.5}, {"name": "pixel", "scale": 1.0}]
