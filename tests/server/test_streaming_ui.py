"""Streaming seen from the user's side: the server's --preview_vae (a tiny VAE for partial images,
loaded at start-up), the CLI's progress bar fed by the OpenAI route's event stream, and the
playground generating on that stream (progress bar, live partial images, reuse seed)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import httpx
import pytest

from helpers.servers import Server
from sdserve.cli.stream_client import sse_events
from sdserve.protocol.image_encoding import read_metadata

STEPS = 4


def tiny_vae(folder, latent_channels: int = 4):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=latent_channels,
    )
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def preview_server(models, start_server, tmp_path_factory):
    folder = tiny_vae(tmp_path_factory.mktemp("taesdxl") / "taesdxl")
    return start_server("--model_dir", str(models["sdxl"]), "--preview_vae", str(folder))


def test_preview_vae_makes_the_partial_images(preview_server):
    assert "partial images: tiny VAE" in preview_server.log()
    body = {"prompt": "a lighthouse", "size": "128x128", "stream": True, "partial_images": 1, "seed": 3,
            "num_inference_steps": STEPS}
    with httpx.stream("POST", f"{preview_server.url}/openai/v1/images/generations", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        events = list(sse_events(response.iter_lines()))
    kinds = [event for event, _ in events]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    partial = events[0][1]
    assert partial["partial_image_index"] == 0 and partial["b64_json"] and partial["seed"] == 3


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: tmp / "missing", "no such directory"),
    (lambda tmp: tiny_vae(tmp / "sd3", latent_channels=16), "16 latent channels, the model 4"),
])
@pytest.mark.slow
def test_a_bad_preview_vae_stops_start_up(models, tmp_path, make, reason):
    server = Server("--model_dir", str(models["sdxl"]), "--preview_vae", str(make(tmp_path)), log_dir=tmp_path)
    try:
        assert server.proc.wait(180) == 2
    finally:
        server.stop()
    log = server.log()
    assert "cannot start: --preview_vae" in log and reason in log


def generate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdserve", "generate", "a red fox", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "100"})


@pytest.mark.parametrize("api", ["v1", "openai"])
def test_cli_progress_bar_streams_the_same_png(preview_server, tmp_path, api):
    same = ["--url", preview_server.url, "--api", api, "--steps", str(STEPS), "--seed", "5", "--width", "128",
            "--height", "128"]
    plain, streamed = tmp_path / "plain.png", tmp_path / "streamed.png"
    run = generate(*same, "-o", str(plain))
    assert run.returncode == 0, run.stderr
    assert f"{STEPS}/{STEPS}" not in run.stderr  # not a terminal: no bar unless asked
    run = generate(*same, "--progress", "-o", str(streamed))
    assert run.returncode == 0, run.stderr
    assert f"{STEPS}/{STEPS}" in run.stderr and "denoising" in run.stderr
    assert f"wrote {streamed} (seed 5)" in run.stdout
    assert streamed.read_bytes() == plain.read_bytes()


def test_cli_progress_with_several_images_writes_the_same_files(preview_server, tmp_path):
    same = ["--url", preview_server.url, "--steps", "2", "--seed", "8", "--num_images", "2", "--width", "128",
            "--height", "128"]
    run = generate(*same, "-o", str(tmp_path / "plain" / "out.png"))
    assert run.returncode == 0, run.stderr
    run = generate(*same, "--progress", "-o", str(tmp_path / "streamed" / "out.png"))
    assert run.returncode == 0, run.stderr
    assert "4/4" in run.stderr
    plain = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert len(plain) == 2 and plain == sorted(p.name for p in (tmp_path / "streamed").iterdir())
    for name in plain:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes()


def test_cli_progress_reports_a_server_error(preview_server, tmp_path):
    run = generate("--url", preview_server.url, "--steps", "0", "--progress", "-o", str(tmp_path / "x.png"))
    assert run.returncode != 0 and "error 400" in run.stderr and "num_inference_steps" in run.stderr


# -- the playground on the stream, in a real headless Chromium ------------------------------------
PLAYGROUND_STEPS = 60

# Records what the page showed, as it showed it: each progress text, each partial image set, and
# whether a partial came before the final images.
WATCH = """() => {
  const seen = window.seen = { texts: [], partials: 0, partialBeforeFinal: false, finals: 0 };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.id === "progress-text") for (const n of r.addedNodes) seen.texts.push(n.textContent);
      if (r.type === "attributes" && r.target.classList.contains("partial")) {
        seen.partials++;
        if (!seen.finals) seen.partialBeforeFinal = true;
      }
      if (r.target.id === "images") seen.finals += r.addedNodes.length;
    }
  }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["src"] });
}"""


def test_playground_streams_progress_and_partial_images(page, preview_server, tmp_path):
    page.goto(f"{preview_server.url}/ui")
    page.wait_for_selector("#form[data-schema=loaded]", state="attached")
    page.fill("#prompt", "a paper boat on a pond")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#num_inference_steps", str(PLAYGROUND_STEPS))  # no seed: a random one
    assert "/openai/v1/images/generations" in page.locator("#curl").inner_text()
    python = page.locator("#python").inner_text()
    assert "client.images.generate(" in python and "partial_images=2" in python
    page.evaluate(WATCH)
    with page.expect_request(lambda r: r.url.endswith("/openai/v1/images/generations")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["stream"] is True and body["stream_progress"] is True and body["partial_images"] == 2
    try:  # while it runs (if the tiny model is not done already)
        page.wait_for_selector("#live img.partial", timeout=30_000)
        (tmp_path / "streaming-partial.png").write_bytes(page.screenshot(full_page=True))
    except Exception as exc:  # noqa: BLE001 - only the screenshot is missed; the watch below still counts
        print("no in-progress screenshot:", exc)
    page.wait_for_selector("figure img", timeout=120_000)
    page.wait_for_function("document.querySelector('figure img').naturalWidth === 128")
    seen = page.evaluate("window.seen")
    steps = [t for t in seen["texts"] if t.startswith("step ")]
    assert f"step {PLAYGROUND_STEPS}/{PLAYGROUND_STEPS}" in steps, seen["texts"]
    assert any(t != steps[-1] for t in steps), steps  # it advanced: earlier steps were shown first
    assert seen["partials"] >= 1 and seen["partialBeforeFinal"], seen
    assert page.locator("#live img").count() == 0 and page.is_hidden("#progress-box")
    status = page.locator("#status").inner_text()
    assert f"1 image(s), 128×128, {PLAYGROUND_STEPS} steps" in status, status
    (tmp_path / "streaming-result.png").write_bytes(page.screenshot(full_page=True))

    seed = page.locator("figcaption.seed").inner_text().removeprefix("seed ")
    result = base64.b64decode(page.get_attribute("figure img", "src").split(",", 1)[1])
    assert str(read_metadata(result)["seed"]) == seed  # exact, even past JavaScript's safe integers
    link = page.locator("figure a.download")
    assert link.get_attribute("href").startswith("data:image/png;base64,")
    assert link.get_attribute("download") == f"sdserve-{seed}.png"
    page.click("figure button.reuse-seed")
    assert page.input_value("#seed") == seed
    curl = page.locator("#curl").inner_text()  # past 2**53, the seed goes as text, which the server reads exactly
    assert f'"seed":{seed}' in curl or f'"seed":"{seed}"' in curl, curl

    # the Python shown runs as shown, with the openai SDK, and makes the same image
    run = subprocess.run([sys.executable, "-c", page.locator("#python").inner_text()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and f"wrote out-{seed}.png" in run.stdout, run.stderr
    assert (tmp_path / f"out-{seed}.png").read_bytes() == result


# -- LoRA adapters in the playground: listed from GET /v1/models/<name>, sent as loras --------------
@pytest.fixture(scope="module")
def lora_server(models, start_server):
    return start_server("--model_dir", str(models["sdxl-loras"]))


def test_playground_lists_and_sends_the_adapters(page, lora_server, tmp_path):
    page.goto(f"{lora_server.url}/ui")
    page.wait_for_selector("#form[data-adapters=loaded][data-schema=loaded]", state="attached")
    assert page.is_visible("#adapters")
    rows = page.locator("#adapter-list .adapter")
    assert sorted(rows.evaluate_all("rows => rows.map((row) => row.dataset.adapter)")) == ["pixel", "trex"]
    assert "loras" not in page.locator("#curl").inner_text()  # none checked: none sent
    trex = page.locator('#adapter-list .adapter[data-adapter="trex"]')
    assert trex.locator("input.adapter-scale").get_attribute("placeholder") == "1"  # no recipe: the default
    page.get_by_label("trex", exact=True).check()
    trex.locator("input.adapter-scale").fill("0.5")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#num_inference_steps", "4")
    shown = '"loras":[{"name":"trex","scale":0.5}]'
    assert shown in page.locator("#curl").inner_text()
    assert shown in page.locator("#python").inner_text()  # passed on in extra_body
    with page.expect_request(lambda r: r.url.endswith("/openai/v1/images/generations")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["loras"] == [{"name": "trex", "scale": 0.5}]
    assert body["width"] == 128 and body["height"] == 128 and body["num_inference_steps"] == 4
    page.wait_for_selector("figure img", timeout=120_000)
    page.wait_for_function("document.querySelector('figure img').naturalWidth === 128")
    assert "1 image(s), 128×128, 4 steps" in page.locator("#status").inner_text()
    (tmp_path / "adapters.png").write_bytes(page.screenshot(full_page=True))

    # an empty scale is left out, so that the server applies the recipe's (or 1)
    trex.locator("input.adapter-scale").fill("")
    assert '"loras":[{"name":"trex"}]' in page.locator("#curl").inner_text()


def test_playground_hides_the_adapters_without_any(page, preview_server):
    page.goto(f"{preview_server.url}/ui")
    page.wait_for_selector("#form[data-adapters=loaded]", state="attached")
    assert page.is_hidden("#adapters")
    assert page.locator("#adapter-list .adapter").count() == 0
