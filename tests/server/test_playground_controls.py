"""The playground's control image slot, in a real headless Chromium: shown only for a model with
control models, it sends the chosen model, image, preprocessor and scale, and the image it shows
is the one a v1 request with the same control gives."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from helpers.browser import CHROMIUM, NO_CHROMIUM
from helpers.control_models import write_controls
from helpers.images import b64_image, encode, make_image
from sdserve.tiny import write_tiny_model

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_server):
    folder = write_tiny_model(tmp_path_factory.mktemp("playground-controls") / "sdxl", "sdxl")
    write_controls(folder, "sdxl", ("edges", "sketch", "style"))
    return start_server("--model_dir", str(folder))


def test_a_control_image_from_the_page_gives_the_v1_image(page, server, tmp_path):
    picture = make_image(128, 128, seed=4)
    (tmp_path / "pose.png").write_bytes(encode(picture))
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#form[data-adapters=loaded]", state="attached")
    assert page.is_visible("#control-input")
    assert page.locator("#control-model option").all_inner_texts() == ["edges (controlnet)", "sketch (t2i-adapter)",
                                                                           "style (ip-adapter)"]
    page.fill("#prompt", "a dancer")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#num_inference_steps", "3")
    page.fill("#seed", "11")
    page.set_input_files("#control-file", str(tmp_path / "pose.png"))
    page.wait_for_selector("#control-preview", state="visible")
    page.select_option("#control-preprocessor", "canny")
    page.fill("#control-scale", "0.8")
    curl = page.locator("#curl").inner_text()
    assert "@request.json" in curl  # the image makes the body too long for a command line
    assert page.evaluate("() => requestBody(false).controls") == [{"model": "edges", "preprocessor": "canny",
                                                                   "scale": 0.8}]
    page.click("#generate")
    page.wait_for_selector("figure img", timeout=60_000)
    src = page.locator("figure img").first.get_attribute("src")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    v1 = server.predict({"instances": [{"prompt": "a dancer", "width": 128, "height": 128, "num_inference_steps": 3,
                                        "seed": 11, "controls": [{"model": "edges", "image": b64_image(picture),
                                                                  "preprocessor": "canny", "scale": 0.8}]}]})
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(v1.json()["predictions"][0]["image"]["b64"]))))
    assert np.array_equal(shown, expected[..., :3])
    page.fill("#control-end", "0.5")
    page.select_option("#control-model", "style")  # an IP-Adapter: no preprocessor, no "until"
    assert not page.is_visible("#control-preprocessor") and not page.is_visible("#control-end")
    assert page.evaluate("() => requestBody(false).controls") == [{"model": "style", "scale": 0.8}]
    page.click("#remove-control")
    assert page.evaluate("() => requestBody(false).controls") is None and "@request.json" not in \
        page.locator("#curl").inner_text()
