"""The playground page in a real headless Chromium (Debian's), driven by Playwright."""

import base64
import io
import json
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers.browser import CHROMIUM, NO_CHROMIUM
from helpers.images import encode, make_image
from sdserve.protocol.image_encoding import read_metadata

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


@pytest.fixture(scope="module")
def limited_server(models, start_server):
    """Tighter limits than the defaults: the page must show these, not its own idea of them."""
    return start_server("--model_dir", str(models["sdxl-refiner"]), "--max_steps", "7", "--max_side", "512")


def open_page(page, server) -> dict:
    """The playground, once it has read the server's request schema; that schema."""
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#form[data-schema]", state="attached")
    assert page.get_attribute("#form", "data-schema") == "loaded"
    return httpx.get(f"{server.url}/v1/models/{server.model_name}/schema").json()


def test_fill_the_form_generate_and_see_images_with_seeds(page, sdxl_server, tmp_path):
    open_page(page, sdxl_server)
    assert page.locator("#model-name").inner_text() == "sdxl"
    page.fill("#prompt", "a paper boat on a pond")
    page.fill("#negative_prompt", "rain")
    page.fill("#width", "128")
    page.fill("#num_inference_steps", "4")
    page.fill("#seed", "123")
    page.fill("#num_images", "2")
    curl = page.locator("#curl").inner_text()
    assert '"prompt":"a paper boat on a pond"' in curl and '"seed":123' in curl and "/openai/v1/images/generations" in curl
    page.click("#generate")
    page.wait_for_selector("figure img", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('figure img').length === 2")
    assert page.locator("figcaption.seed").all_inner_texts() == ["seed 123", "seed 124"]
    src = page.locator("figure img").first.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    page.wait_for_function("document.querySelector('figure img').naturalWidth === 128")
    assert "2 image(s), 128×256, 4 steps" in page.locator("#status").inner_text()
    (tmp_path / "shot.png").write_bytes(page.screenshot(full_page=True))
    assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"


def test_errors_are_shown_on_the_page(page, sdxl_server):
    open_page(page, sdxl_server)
    page.fill("#num_inference_steps", "1000")  # marked out of range, but sent: the server's message says why
    assert page.eval_on_selector("#num_inference_steps", "el => el.validity.rangeOverflow")
    page.click("#generate")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "num_inference_steps: must be an integer from 1 to 100" in page.locator("#status").inner_text()
    assert page.locator("#generate").is_enabled()


def _data_url_image(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_upload_an_image_paint_a_mask_and_inpaint(page, sdxl_server, tmp_path):
    (tmp_path / "fox.png").write_bytes(encode(make_image(128, 128, seed=3)))
    open_page(page, sdxl_server)
    page.fill("#prompt", "a fox in the snow")
    page.fill("#width", "256")  # typed before the image: the image's size replaces it
    page.fill("#num_inference_steps", "4")
    page.fill("#seed", "7")
    page.set_input_files("#image-file", str(tmp_path / "fox.png"))
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.input_value("#width") == "" and page.get_attribute("#width", "placeholder") == "128 (image)"
    assert page.locator("#strength-value").inner_text() == "0.80"
    assert page.eval_on_selector("#mask-canvas", "c => [c.width, c.height]") == [128, 128]  # the image's size

    page.fill("#brush-size", "40")  # screen pixels: about 15 of the image's (the preview is larger)
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()  # the mouse only reaches the viewport

    def at(x, y):  # image pixel -> viewport coordinates (asked each time: clicks may scroll)
        box = canvas.bounding_box()
        return box["x"] + x * box["width"] / 128, box["y"] + y * box["height"] / 128

    for y in (30, 50):  # two horizontal brush strokes across the top half
        page.mouse.move(*at(10, y))
        page.mouse.down()
        page.mouse.move(*at(110, y), steps=8)
        page.mouse.up()
    page.click("#tool-eraser")
    page.mouse.move(*at(60, 15))  # an eraser stroke down the middle of both
    page.mouse.down()
    page.mouse.move(*at(60, 60), steps=5)
    page.mouse.up()
    page.click("#tool-brush")
    assert page.locator("#strength-value").inner_text() == "1.00"  # the server's inpainting default
    page.focus("#strength")
    for _ in range(8):  # down from 1.00 to 0.60 with the keyboard, in steps of 0.05
        page.keyboard.press("ArrowLeft")
    assert page.locator("#strength-value").inner_text() == "0.60"
    (tmp_path / "image-input-painted.png").write_bytes(page.screenshot(full_page=True))

    with page.expect_request(lambda r: r.url.endswith("/openai/v1/images/generations")) as sent:
        page.click("#generate")
    instance = sent.value.post_data_json
    assert instance["strength"] == 0.6 and "width" not in instance and "height" not in instance
    assert _data_url_image(instance["image"]).tobytes() == make_image(128, 128, seed=3).tobytes()
    mask = np.asarray(_data_url_image(instance["mask"]).convert("L"))
    assert mask.shape == (128, 128)
    assert mask[30, 20] == mask[50, 100] == 255  # painted: repaint
    assert mask[30, 60] == mask[50, 60] == 0  # erased
    assert mask[100, 20] == mask[5, 64] == mask[30, 125] == 0  # never painted: keep
    assert ((mask == 0) | (mask == 255)).mean() > 0.95  # gray only along the strokes' edges

    page.wait_for_selector("figure img", timeout=60_000)
    page.wait_for_function("document.querySelector('figure img').naturalWidth === 128")
    status = page.locator("#status").inner_text()
    assert "1 image(s), 128×128, 4 steps, inpaint at strength 0.6" in status, status
    (tmp_path / "image-input-result.png").write_bytes(page.screenshot(full_page=True))


def test_dropped_image_without_a_mask_is_img2img_and_can_be_removed(page, sdxl_server, tmp_path):
    schema = open_page(page, sdxl_server)
    page.fill("#num_inference_steps", "4")
    png = base64.b64encode(encode(make_image(160, 96, seed=5))).decode()
    dropped = page.evaluate_handle(
        """(b64) => { const data = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            data.items.add(new File([bytes], "drop.png", { type: "image/png" })); return data; }""", png)
    page.dispatch_event("#image-input", "drop", {"dataTransfer": dropped})
    page.wait_for_selector("#mask-canvas", state="visible")
    assert "drop.png: 160×96" in page.locator("#image-hint").inner_text()
    assert "@request.json" in page.locator("#curl").inner_text() and page.is_visible("#request-json")

    with page.expect_request(lambda r: r.url.endswith("/openai/v1/images/generations")) as sent:
        page.click("#generate")
    instance = sent.value.post_data_json
    assert instance["image"] == f"data:image/png;base64,{png}"  # the file as it was
    assert "mask" not in instance and instance["strength"] == 0.8
    page.wait_for_function("document.querySelector('figure img')?.naturalWidth === 160", timeout=60_000)
    assert "160×96, 4 steps, img2img at strength 0.8" in page.locator("#status").inner_text()
    # a random seed has up to 63 bits: the caption must show it exactly, as the PNG stores it
    result = base64.b64decode(page.get_attribute("figure img", "src").split(",", 1)[1])
    assert page.locator("figcaption.seed").inner_text() == f"seed {read_metadata(result)['seed']}"
    (tmp_path / "image-input-img2img.png").write_bytes(page.screenshot(full_page=True))

    # the curl shown reads the body from the download next to it, and works as shown
    with page.expect_download() as download:
        page.click("#request-json")
    download.value.save_as(tmp_path / "request.json")
    assert json.loads((tmp_path / "request.json").read_text())["image"].endswith(png)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", page.locator("#curl").inner_text()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("seed "), run.stderr
    assert Image.open(tmp_path / "out.png").size == (160, 96)

    page.click("#remove-image")
    assert page.is_hidden("#image-editor")
    assert page.get_attribute("#width", "placeholder") == f"{schema['properties']['width']['default']} (default)"
    curl = page.locator("#curl").inner_text()
    assert '"prompt"' in curl and "strength" not in curl and "@request.json" not in curl


def _bounds(page, selector: str) -> dict:
    return page.eval_on_selector(selector, "el => ({min: el.min, max: el.max, step: el.step, placeholder: el.placeholder})")


def _options(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(f"{selector} option", "options => options.map(o => o.value)")


def _enum(field: dict) -> list[str]:
    return next(branch.get("enum", [branch.get("const")]) for branch in [field, *field.get("anyOf", [])]
                if "enum" in branch or "const" in branch)


def test_controls_follow_the_server_schema(page, limited_server, tmp_path):
    fields = open_page(page, limited_server)["properties"]
    steps = _bounds(page, "#num_inference_steps")
    assert steps["max"] == "7" and steps["min"] == "1" and steps["step"] == "1"  # --max_steps 7
    assert steps["placeholder"] == f"{fields['num_inference_steps']['default']} (default)"
    for side in ("#width", "#height"):  # --max_side 512, in the model's multiple of 8
        assert _bounds(page, side) == {"min": "64", "max": "512", "step": "8",
                                       "placeholder": f"{fields['width']['default']} (default)"}
    guidance = _bounds(page, "#guidance_scale")
    assert float(guidance["max"]) == fields["guidance_scale"]["maximum"] and guidance["step"] == "any"
    assert guidance["placeholder"] == f"{fields['guidance_scale']['default']:g} (default)"
    assert float(_bounds(page, "#num_images")["max"]) == fields["num_images"]["maximum"]
    assert float(_bounds(page, "#quality")["max"]) == fields["quality"]["maximum"]
    assert float(_bounds(page, "#refiner_strength")["placeholder"].split()[0]) == fields["refiner_strength"]["default"]
    assert page.eval_on_selector("#strength", "el => [el.min, el.max]") == ["0.05", "1"]  # (0, 1] in steps of 0.05
    # the choices are the schema's: this model family's samplers, this server's refiner modes
    assert _options(page, "#scheduler") == ["", *_enum(fields["scheduler"])]
    assert page.locator("#scheduler option").first.inner_text() == "model default"
    assert _options(page, "#refiner") == ["", *_enum(fields["refiner"])] and page.is_visible("#refiner")
    assert page.locator("#refiner option").first.inner_text() == f"default ({fields['refiner']['default']})"
    assert _options(page, "#format") == ["", *_enum(fields["format"])]
    (tmp_path / "schema-controls.png").write_bytes(page.screenshot(full_page=True))

    chosen = _enum(fields["scheduler"])[-1]
    page.fill("#num_inference_steps", "8")
    assert page.eval_on_selector("#num_inference_steps", "el => el.validity.rangeOverflow")
    page.fill("#num_inference_steps", "4")
    page.fill("#width", "128")
    page.fill("#seed", "5")
    page.select_option("#scheduler", chosen)
    page.select_option("#refiner", "refine")
    page.select_option("#format", "webp")
    assert f'"scheduler":"{chosen}"' in page.locator("#curl").inner_text()
    with page.expect_response(lambda r: r.url.endswith("/openai/v1/images/generations"), timeout=60_000) as answer:
        page.click("#generate")
    instance = answer.value.request.post_data_json  # the OpenAI route's names for format (and n)
    assert instance == {"model": "sdxl", "prompt": instance["prompt"], "width": 128, "num_inference_steps": 4,
                        "seed": 5, "scheduler": chosen, "refiner": "refine", "output_format": "webp",
                        "stream": True, "stream_progress": True, "partial_images": 2}
    assert answer.value.ok and answer.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_function("document.querySelector('figure img')?.naturalWidth === 128", timeout=60_000)
    assert page.get_attribute("figure img", "src").startswith("data:image/webp;base64,")
    assert "4 steps" in page.locator("#status").inner_text()


@pytest.mark.slow
def test_choices_are_the_loaded_models(page, models, start_server):
    server = start_server("--model_dir", str(models["sd3"]), model_name="sd3")
    fields = open_page(page, server)["properties"]
    samplers = _options(page, "#scheduler")
    assert samplers == ["", *_enum(fields["scheduler"])] and "DPM++ 2M" not in samplers  # flow-matching ones
    assert page.is_hidden("#refiner-controls")  # no refiner: the schema allows "none" only
    assert _options(page, "#refiner") == ["", "none"]


def test_without_the_schema_the_page_still_works(page, limited_server):
    page.route("**/schema", lambda route: route.fulfill(status=503, body="unavailable"))
    try:
        page.goto(f"{limited_server.url}/ui")
        page.wait_for_selector("#form[data-schema=unavailable]", state="attached")
        assert "request schema could not be read" in page.locator("#status").inner_text()
        # plain controls: no bounds; the choices are typed, and checked by the server
        assert _bounds(page, "#num_inference_steps")["max"] == ""
        assert page.eval_on_selector("#scheduler", "el => el.tagName") == "INPUT"
        page.fill("#num_inference_steps", "3")
        page.fill("#width", "64")
        page.fill("#scheduler", "euler_a")
        with page.expect_request(lambda r: r.url.endswith("/openai/v1/images/generations")) as sent:
            page.click("#generate")
        assert sent.value.post_data_json["scheduler"] == "euler_a"
        page.wait_for_function("document.querySelector('figure img')?.naturalWidth === 64", timeout=60_000)
        page.fill("#num_inference_steps", "9")
        page.click("#generate")
        page.wait_for_selector("#status.error", timeout=60_000)
        assert "num_inference_steps: must be an integer from 1 to 7" in page.locator("#status").inner_text()
    finally:
        page.unroute("**/schema")
