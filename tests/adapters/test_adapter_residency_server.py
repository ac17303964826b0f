"""A server with more adapters than ``--max_loaded_adapters``: concurrent requests for different
adapters all succeed (in shared denoiser calls), adapters are unloaded and loaded again as they
are needed, the metrics say so, and bad adapter requests are a 400 while the rest go on."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest

from helpers.images import decode_png
from helpers.oracle import TOLERANCE, diff_p99, max_diff

REQUEST = {"prompt": "a red fox", "num_inference_steps": 6, "width": 64, "height": 64, "seed": 5}


@pytest.fixture(scope="module")
def server(models, start_server):
    return start_server("--model_dir", str(models["sdxl-loras"]), "--max_loaded_adapters", "1",
                        "--max_batch_wait_ms", "200", model_name="residency")


def scrape(server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def value(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_more_adapters_in_flight_than_the_bound_all_succeed_and_are_counted(server):
    loras = [[], ["trex"], [{"name": "pixel", "scale": 0.6}], ["trex", "pixel"], ["pixel"], ["trex"]]
    bad = [{"loras": ["nope"]}, {"loras": [f"a{i}" for i in range(9)]}]
    with concurrent.futures.ThreadPoolExecutor(len(loras) + len(bad)) as pool:
        answers = [pool.submit(server.predict, {"instances": [{**REQUEST, "loras": named}]}) for named in loras]
        refused = [pool.submit(server.predict, {"instances": [{**REQUEST, **extra}]}) for extra in bad]
        images = [decode_png(a.result().json()["predictions"][0]["image"]["b64"]) for a in answers]
        unknown, too_many = (r.result() for r in refused)
    assert unknown.status_code == 400 and "loras[0].name" in unknown.json()["error"]
    assert "available: pixel, trex" in unknown.json()["error"]
    assert too_many.status_code == 400 and "loras" in too_many.json()["error"]
    # the same request gives the same image, whatever ran beside it; other adapters, another image
    assert diff_p99(images[1], images[5]) <= TOLERANCE
    assert max_diff(images[0], images[1]) > 2 * TOLERANCE and max_diff(images[1], images[4]) > 2 * TOLERANCE
    text = scrape(server)
    assert value(text, 'sdserve_lora_loads_total{result="ok"}') >= 2
    assert value(text, "sdserve_lora_resident") >= 1
    assert 'sdserve_adapter_sets_per_call_bucket{le="1.0"}' in text
    # one adapter at a time is loaded when none is in flight: the next load unloads the other
    for name in ("trex", "pixel", "trex"):
        assert server.predict({"instances": [{**REQUEST, "loras": [name]}]}).status_code == 200
    text = scrape(server)
    assert value(text, "sdserve_lora_evictions_total") >= 2
    assert value(text, "sdserve_lora_resident") == 1


def test_the_bound_must_be_positive():
    from sdserve.server.settings import load_config

    with pytest.raises(SystemExit):
        load_config(["--max_loaded_adapters", "0"])
