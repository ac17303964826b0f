"""The server as an operator sees it: start-up, health under load, back-pressure, metrics."""

import concurrent.futures
import json
import re
import subprocess
import sys
import time

import httpx
import pytest

SLOW = {"width": 1024, "height": 1024, "num_inference_steps": 100}


@pytest.mark.slow
def test_health_answers_quickly_while_an_image_is_generated(sdxl_server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(sdxl_server.predict, {"instances": [{"prompt": "a slow one", **SLOW}]})
        time.sleep(1.0)  # let the worker start
        latencies = []
        while not slow.done() and len(latencies) < 20:
            for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/sdxl/ready", "/v1/models/sdxl", "/metrics"):
                start = time.perf_counter()
                assert httpx.get(sdxl_server.url + path, timeout=5).status_code == 200
                latencies.append(time.perf_counter() - start)
            time.sleep(0.1)
        assert not slow.done(), "the generation finished before health was probed; make SLOW slower"
        assert slow.result().status_code == 200
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


@pytest.mark.slow
def test_full_queue_answers_503_with_retry_after_and_recovers(models, start_server):
    server = start_server("--model_dir", str(models["sdxl"]), "--max_queue", "1", "--max_batch_images", "1", "--max_active_images", "1",
                          "--retry_after", "3", model_name="busy")
    payload = {"instances": [{"prompt": "queue me", "width": 1024, "height": 1024, "num_inference_steps": 40}]}
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: server.predict(payload), range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 3, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3" and "server busy" in r.json()["error"]
    assert server.predict({"instances": [{"prompt": "after", "num_inference_steps": 2}]}).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'sdserve_request_failures_total\{reason="queue_full"\} [1-9]', metrics)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda tmp: tmp / "missing", "does not exist or is not a directory"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no diffusers model found in"),
    ],
    ids=["missing", "empty"],
)
@pytest.mark.slow
def test_start_up_fails_clearly_without_a_model(start_server, tmp_path, setup, message):
    server = start_server("--model_dir", str(setup(tmp_path)), wait=False)
    assert server.proc.wait(120) == 2
    assert message in server.log() and "cannot start" in server.log()


@pytest.mark.slow
def test_bad_flags_are_usage_errors():
    run = subprocess.run([sys.executable, "-m", "sdserve", "--max_steps", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "max_steps must be at least 1" in run.stderr
    run = subprocess.run([sys.executable, "-m", "sdserve", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--workers must be 1" in run.stderr


def test_metrics_count_images_steps_and_failures(sdxl_server):
    before = httpx.get(f"{sdxl_server.url}/metrics").text
    calls_before = float(re.search(r'^sdserve_denoiser_calls_total\{phase="refiner"\} (\S+)', before, re.M).group(1)
                         if 'phase="refiner"' in before else 0)
    assert sdxl_server.predict({"instances": [{"prompt": "x", "num_inference_steps": 2, "num_images": 2}]}).status_code == 200
    assert sdxl_server.predict({"instances": [{"prompt": "x", "num_inference_steps": -1}]}).status_code == 400
    text = httpx.get(f"{sdxl_server.url}/metrics").text
    images = float(re.search(r"^sdserve_images_generated_total (\S+)", text, re.M).group(1))
    assert images >= 2
    assert re.search(r'^sdserve_request_failures_total\{reason="invalid_input"\} [1-9]', text, re.M)
    assert 'sdserve_generation_seconds_bucket{le="600.0"}' in text
    assert re.search(r"^sdserve_batch_size_images_count [1-9]", text, re.M)
    assert re.search(r"^sdserve_queue_depth 0.0", text, re.M)
    assert re.search(r'^sdserve_requests_total\{protocol="v1"\} [1-9]', text, re.M)
    # the step loop: 2 steps, ensemble by default: one base call and one refiner call for both images
    calls = float(re.search(r'^sdserve_denoiser_calls_total\{phase="refiner"\} (\S+)', text, re.M).group(1))
    assert calls >= calls_before + 1
    assert re.search(r'^sdserve_denoiser_rows_bucket\{le="4.0"\} [1-9]', text, re.M)  # 2 guided images: 4 rows
    assert re.search(r"^sdserve_active_images 0.0", text, re.M)
    assert re.search(r"^sdserve_time_to_first_step_seconds_count [1-9]", text, re.M)


def test_sd_folder_at_the_root_serves_with_its_own_defaults(models, start_server):
    server = start_server("--model_dir", str(models["sd"]), model_name="sd2")
    r = server.predict({"instances": [{"prompt": "a hill", "num_inference_steps": 3, "seed": 1}]})
    assert r.status_code == 200, r.text
    params = r.json()["predictions"][0]["parameters"]
    assert params["width"] == 256 and params["guidance_scale"] == 7.5 and params["refiner"] == "none"
    r = server.predict({"instances": [{"prompt": "a hill", "prompt_2": "also"}]})
    assert r.status_code == 400 and "prompt_2: only SDXL, SD3 and FLUX.1 models accept this field" in r.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, pipeline", [("sdxl", "StableDiffusionXLPipeline"), ("flux", "FluxPipeline")])
def test_tiny_model_command_writes_a_servable_folder(tmp_path, kind, pipeline):
    run = subprocess.run([sys.executable, "-m", "sdserve", "tiny-model", str(tmp_path / "m"), "--kind", kind],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    tokenizer = tmp_path / "m" / "tokenizer"
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == pipeline
    assert (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").read_text().startswith("#version")


def test_rejections_are_logged_once_with_the_request_id(sdxl_server):
    r = sdxl_server.predict({"instances": [{"prompt": "x", "width": 7}]}, headers={"x-request-id": "req-log-1"})
    assert r.status_code == 400
    time.sleep(0.3)
    lines = [line for line in sdxl_server.log().splitlines() if "req-log-1" in line]
    assert len(lines) == 1 and "rejected: instances[0].width" in lines[0]
    assert "InvalidInput" not in sdxl_server.log()  # no traceback for a client error
