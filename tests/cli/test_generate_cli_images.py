"""``sdserve generate --image/--mask/--strength``: img2img and inpainting from the terminal, against a
real server and locally (``--model_dir``), as a user runs it (a subprocess); and ``--show_parameters``,
the fields' allowed values as the server's request schema has them."""

import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers.images import encode, make_image, make_mask
from sdserve.protocol.image_encoding import read_metadata


def generate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdserve", "generate", "a red fox", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "in.png").write_bytes(encode(make_image(128, 128, seed=4)))
    (folder / "in.jpg").write_bytes(encode(make_image(160, 96, seed=4), "JPEG"))
    (folder / "m.png").write_bytes(encode(make_mask(128, 128)))
    return folder


@pytest.fixture(scope="module")
def sd_server(models, start_server):
    return start_server("--model_dir", str(models["sd"]), model_name="sd")


def picture(path) -> Image.Image:
    return Image.open(io.BytesIO(path.read_bytes()))


def test_inpaint_and_img2img_against_a_server(sd_server, inputs, tmp_path):
    out = tmp_path / "out.png"
    run = generate("--url", sd_server.url, "--model_name", "sd", "--image", str(inputs / "in.png"),
                   "--mask", str(inputs / "m.png"), "--strength", "0.6", "--steps", "4", "--seed", "3", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert picture(out).size == (128, 128)  # the image's size: no width/height given
    meta = read_metadata(out.read_bytes())
    assert meta["mode"] == "inpaint" and meta["strength"] == 0.6 and meta["seed"] == 3
    assert "image" not in meta and "mask" not in meta

    jpeg = tmp_path / "jpeg.png"
    run = generate("--url", sd_server.url, "--model_name", "sd", "--image", str(inputs / "in.jpg"), "--steps", "4",
                   "-o", str(jpeg))
    assert run.returncode == 0, run.stderr
    assert picture(jpeg).size == (160, 96)
    meta = read_metadata(jpeg.read_bytes())
    assert meta["mode"] == "img2img" and meta["strength"] == 0.8  # the server's img2img default

    openai = tmp_path / "openai.png"  # the OpenAI route takes sdserve's fields as well
    run = generate("--url", sd_server.url, "--model_name", "sd", "--api", "openai", "--image", str(inputs / "in.png"),
                   "--mask", str(inputs / "m.png"), "--strength", "0.5", "--steps", "4", "-o", str(openai))
    assert run.returncode == 0, run.stderr
    assert picture(openai).size == (128, 128) and read_metadata(openai.read_bytes())["strength"] == 0.5


@pytest.mark.slow
def test_inpaint_locally_matches_the_server(models, sd_server, inputs, tmp_path):
    local, remote = tmp_path / "local.png", tmp_path / "remote.png"
    same = ["--image", str(inputs / "in.png"), "--mask", str(inputs / "m.png"), "--strength", "0.6", "--steps", "4",
            "--seed", "9"]
    run = generate("--model_dir", str(models["sd"]), *same, "-o", str(local))
    assert run.returncode == 0, run.stderr
    assert "100%" in run.stderr  # the progress bar
    assert picture(local).size == (128, 128)
    meta = read_metadata(local.read_bytes())
    assert meta["mode"] == "inpaint" and meta["strength"] == 0.6 and meta["seed"] == 9
    run = generate("--url", sd_server.url, "--model_name", "sd", *same, "-o", str(remote))
    assert run.returncode == 0, run.stderr
    a, b = (np.asarray(picture(p).convert("RGB")).astype(int) for p in (local, remote))
    assert np.abs(a - b).max() <= 2  # the same request through the same parser and engine


@pytest.mark.slow
def test_clear_errors(models, sd_server, inputs, tmp_path):
    run = generate("--url", sd_server.url, "--mask", str(inputs / "m.png"))
    assert run.returncode == 1 and "--mask needs --image" in run.stderr
    run = generate("--url", sd_server.url, "--image", str(tmp_path / "missing.png"))
    assert run.returncode == 1 and f"--image {tmp_path / 'missing.png'}: No such file or directory" in run.stderr
    run = generate("--url", sd_server.url, "--image", str(inputs / "in.png"), "--mask", str(tmp_path))
    assert run.returncode == 1 and "--mask" in run.stderr and "Is a directory" in run.stderr
    # what only the parser can tell: the server's and the local one's say the same
    (tmp_path / "notes.png").write_text("not an image")
    bad = ["--image", str(tmp_path / "notes.png"), "--steps", "4"]
    run = generate("--url", sd_server.url, "--model_name", "sd", *bad)
    assert run.returncode == 1 and "image: not a readable PNG, JPEG or WebP image" in run.stderr
    run = generate("--model_dir", str(models["sd"]), *bad)
    assert run.returncode == 1 and "image: not a readable PNG, JPEG or WebP image" in run.stderr
    run = generate("--url", sd_server.url, "--model_name", "sd", "--image", str(inputs / "in.jpg"),
                   "--mask", str(inputs / "m.png"), "--steps", "4")
    assert run.returncode == 1 and "differs from the image's size" in run.stderr


def shown(stdout: str) -> dict[str, str]:
    """--show_parameters' lines by field name."""
    return {line.split()[0]: line for line in stdout.splitlines()[1:]}


def test_show_parameters_prints_the_servers_schema(models, start_server):
    server = start_server("--model_dir", str(models["sd3"]), "--max_steps", "9", "--max_side", "640", model_name="sd3")
    schema = httpx.get(f"{server.url}/v1/models/sd3/schema").json()
    run = generate("--url", server.url, "--model_name", "sd3", "--show_parameters")
    assert run.returncode == 0, run.stderr
    lines = shown(run.stdout)
    assert list(lines) == list(schema["properties"])  # one line per field, nothing else
    steps = schema["properties"]["num_inference_steps"]
    assert steps["maximum"] == 9
    assert lines["num_inference_steps"].split()[:4] == ["num_inference_steps", "--steps", "integer", str(steps["default"])]
    assert "[1, 9]" in lines["num_inference_steps"]
    assert "[64, 640], multiple of" in lines["width"]
    samplers = schema["properties"]["scheduler"]["anyOf"][0]["enum"]  # the flow-matching family's
    assert "one of: " + ", ".join(samplers) + "  #" in lines["scheduler"] and "DPM++ 2M" not in lines["scheduler"]
    assert "one of: none; true or false  #" in lines["refiner"]  # no refiner loaded: none only
    assert "(0.0, 1.0]" in lines["strength"] and lines["prompt"].split()[3] == "(required)"

    run = subprocess.run([sys.executable, "-m", "sdserve", "generate", "--url", server.url, "--model_name", "nope",
                          "--show_parameters"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "error 404" in run.stderr
    run = subprocess.run([sys.executable, "-m", "sdserve", "generate", "--url", server.url], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "required: prompt" in run.stderr  # a prompt is needed to generate


@pytest.mark.slow
def test_show_parameters_locally_matches_the_server(models, sd_server):
    remote = generate("--url", sd_server.url, "--model_name", "sd", "--show_parameters")
    local = generate("--model_dir", str(models["sd"]), "--show_parameters")  # the same limits: the defaults
    assert remote.returncode == local.returncode == 0, remote.stderr + local.stderr
    assert local.stdout == remote.stdout
    assert "[1, 100]" in shown(local.stdout)["num_inference_steps"]
    assert "DPM++ 2M Karras" in shown(local.stdout)["scheduler"]
