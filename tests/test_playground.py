"""The playground page in a real headless Chromium (Debian's), driven by Playwright."""

import base64
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed CI machine with no network beyond loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)"
)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        yield page
        browser.close()


def test_fill_the_form_generate_and_see_images_with_seeds(page, sdxl_server, tmp_path):
    page.goto(f"{sdxl_server.url}/ui")
    assert page.locator("#model-name").inner_text() == "sdxl"
    page.fill("#prompt", "a paper boat on a pond")
    page.fill("#negative_prompt", "rain")
    page.fill("#width", "128")
    page.fill("#num_inference_steps", "4")
    page.fill("#seed", "123")
    page.fill("#num_images", "2")
    curl = page.locator("#curl").inner_text()
    assert '"prompt":"a paper boat on a pond"' in curl and '"seed":123' in curl and "/v1/models/sdxl:predict" in curl
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
    page.goto(f"{sdxl_server.url}/ui")
    page.fill("#num_inference_steps", "1000")  # the browser allows it, the server's limit does not
    page.click("#generate")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "num_inference_steps: must be an integer from 1 to 100" in page.locator("#status").inner_text()
    assert page.locator("#generate").is_enabled()
