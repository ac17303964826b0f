"""Fewer denoiser FLOPs over the wire: the fields on v1 and OpenAI requests, the rows saved in the
response's timings, the metrics that count rows run and saved, and the server's defaults."""

from __future__ import annotations

import re

import httpx
import pytest

SMALL = {"prompt": "a fox", "num_inference_steps": 6, "width": 64, "height": 64, "seed": 3, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def server(models, start_server):
    # the server's default: guidance over the middle of the schedule only
    return start_server("--model_dir", str(models["sdxl"]), "--guidance_interval", "0.2,0.8", model_name="savings")


def counter(server, name: str, label: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf'^{name}{{{label}}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_rows_saved_are_in_the_timings_and_the_metrics(server):
    before = counter(server, "sdserve_denoiser_rows_saved_total", 'reason="cache"')
    answer = server.predict({"instances": [{**SMALL, "cache": "deep", "cache_interval": 3}]})
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["predictions"][0]
    # steps 0, 1 and 5 of 6 unguided (the server's [0.2, 0.8]: 0/6 and 1/6 < 0.2, 5/6 >= 0.8); cached: step 1
    # (one row), steps 4 and 5 (two rows, one): step 2 runs full, its guidance needs a row step 0 did not keep
    assert prediction["timings"]["rows_saved"] == {"guidance_interval": 3, "cache": 4}
    assert prediction["parameters"]["guidance_interval"] == [0.2, 0.8] and prediction["parameters"]["cache"] == "deep"
    assert counter(server, "sdserve_denoiser_rows_saved_total", 'reason="cache"') - before == 4
    assert counter(server, "sdserve_denoiser_rows_run_total", 'work="cached"') >= 4


def test_a_request_overrides_the_default_and_bad_values_are_a_400(server):
    full = server.predict({"instances": [{**SMALL, "guidance_interval": [0, 1]}]}).json()["predictions"][0]
    assert "rows_saved" not in full["timings"]  # nothing asked for, nothing saved
    bad = server.predict({"instances": [{**SMALL, "guidance_interval": [0.9, 0.1]}]})
    assert bad.status_code == 400 and "instances[0].guidance_interval: [lo, hi] with lo < hi" in bad.json()["error"]
    openai = httpx.post(f"{server.url}/openai/v1/images/generations", timeout=120, json={
        "model": server.model_name, "prompt": "a fox", "size": "64x64", "response_format": "b64_json",
        "cache": "deep", "num_inference_steps": 4})
    assert openai.status_code == 200, openai.text
