"""When things go wrong: deadlines, disconnects, SIGTERM, out-of-memory, a wedged worker, bad
actors. Each against a real server process."""

import asyncio
import concurrent.futures
import json
import re
import signal
import time

import grpc
import httpx
import pytest

SLOW = {"prompt": "a slow one", "width": 1024, "height": 1024, "num_inference_steps": 100}


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def quick(server, **headers) -> httpx.Response:
    return server.predict({"instances": [{"prompt": "quick", "num_inference_steps": 2}]}, headers=headers)


def test_deadline_header_gives_504_and_stops_the_work(sdxl_server):
    before = metric(sdxl_server, 'sdserve_request_failures_total{reason="interrupted"}')
    start = time.monotonic()
    r = sdxl_server.predict({"instances": [SLOW]}, headers={"x-request-timeout": "1"})
    assert r.status_code == 504 and "request deadline passed" in r.json()["error"]
    assert time.monotonic() - start < 5
    t0 = time.monotonic()
    assert quick(sdxl_server).status_code == 200
    assert time.monotonic() - t0 < 5  # the 100-step batch did not keep the worker busy
    assert metric(sdxl_server, 'sdserve_request_failures_total{reason="interrupted"}') > before
    bad = sdxl_server.predict({"instances": ["x"]}, headers={"x-request-timeout": "soon"})
    assert bad.status_code == 400 and "x-request-timeout header: must be seconds" in bad.json()["error"]


def test_a_client_that_disconnects_frees_the_worker(sdxl_server):
    with pytest.raises(httpx.ReadTimeout):
        sdxl_server.predict({"instances": [SLOW]}, timeout=1.0)  # the client gives up and closes
    t0 = time.monotonic()
    assert quick(sdxl_server).status_code == 200
    assert time.monotonic() - t0 < 5
    time.sleep(0.3)
    log = sdxl_server.log()
    assert "client disconnected from POST /v1/models/sdxl:predict" in log
    assert re.search(r"request \S+ stopped at step \d+ of 100: its caller is gone", log)


def test_long_prompts_generate_with_a_warning(sdxl_server):
    long_prompt = ", ".join(["a very detailed castle on a hill under a starry sky"] * 12)
    r = sdxl_server.predict({"instances": [{"prompt": long_prompt, "num_inference_steps": 2}]})
    assert r.status_code == 200
    (warning,) = r.json()["predictions"][0]["warnings"]
    assert warning.startswith("prompt: ") and "the text encoder reads the first 77" in warning
    assert "warnings" not in quick(sdxl_server).json()["predictions"][0]


@pytest.fixture(scope="module")
def guarded(models, start_server):
    return start_server("--model_dir", str(models["sdxl"]), "--api_key", "s3cret-key-123",
                        "--max_body_bytes", "4096", "--max_side", "256", "--max_steps", "3",
                        "--max_images", "2", model_name="guarded")


def test_bearer_token_guards_generation_but_not_health(guarded):
    r = guarded.predict({"instances": ["x"]})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert guarded.predict({"instances": ["x"]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = guarded.predict({"instances": ["x"]}, headers={"Authorization": "Bearer s3cret-key-123"})
    assert ok.status_code == 200
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/guarded/ready", "/metrics"):
        assert httpx.get(guarded.url + path).status_code == 200
    infer = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    assert guarded.infer(infer).status_code == 401
    assert "s3cret-key-123" not in guarded.log()


def test_bearer_token_for_openai_sdk_and_grpc(guarded):
    import openai
    from kserve import InferInput, InferRequest
    from kserve.inference_client import InferenceGRPCClient

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/openai/v1", api_key="nope", max_retries=0).images.generate(prompt="x")
    good = openai.OpenAI(base_url=f"{guarded.url}/openai/v1", api_key="s3cret-key-123", max_retries=0)
    assert len(good.images.generate(prompt="x").data) == 1

    async def call(token):
        client = InferenceGRPCClient(guarded.grpc_target, timeout=60)
        prompt = InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(__import__("numpy").array(["x"], dtype=object), binary_data=False)
        headers = (("authorization", f"Bearer {token}"),) if token else None
        try:
            return await client.infer(InferRequest(model_name="guarded", infer_inputs=[prompt]), headers=headers)
        finally:
            await client.close()

    with pytest.raises(grpc.RpcError) as err:
        asyncio.run(call(None))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(call("s3cret-key-123")).outputs[1].name == "seed"


def test_malformed_v2_bodies_name_the_field(guarded):
    auth = {"Authorization": "Bearer s3cret-key-123", "content-type": "application/json"}
    r = httpx.post(f"{guarded.url}/v2/models/guarded/infer", content='{"prompt": Infinity}', headers=auth)
    assert r.status_code == 422 and "inputs: Field required" in r.json()["error"]
    r = httpx.post(f"{guarded.url}/v2/models/guarded/infer", headers=auth,
                   content='{"inputs": [{"name": "prompt", "shape": [1], "datatype": 7, "data": ["x"]}]}')
    assert r.status_code == 422 and "inputs.0.datatype: Input should be a valid string" in r.json()["error"]


def test_body_size_limit(guarded):
    r = guarded.predict({"instances": [{"prompt": "x" * 5000}]}, headers={"Authorization": "Bearer s3cret-key-123"})
    assert r.status_code == 413 and "over the limit of 4096 bytes" in r.json()["error"]


@pytest.mark.slow
def test_out_of_memory_is_retried_in_halves_then_507(models, start_server):
    # any denoiser call of more than two 128x128 images "runs out of memory"
    server = start_server("--model_dir", str(models["sdxl"]), "--max_batch_images", "4", model_name="oom",
                          env={"SDSERVE_FAULT_OOM_PIXELS": str(2 * 128 * 128)})
    r = server.predict({"instances": [{"prompt": "x", "width": 128, "height": 128, "num_images": 4,
                                       "num_inference_steps": 2, "seed": 1}]})
    assert r.status_code == 200 and [i["seed"] for i in r.json()["predictions"][0]["images"]] == [1, 2, 3, 4]
    assert metric(server, "sdserve_oom_retries_total") >= 1
    big = server.predict({"instances": [{"prompt": "x", "width": 512, "height": 512, "num_inference_steps": 2}]})
    assert big.status_code == 507
    assert "out of accelerator memory generating one 512x512 image" in big.json()["error"]
    assert metric(server, 'sdserve_request_failures_total{reason="out_of_memory"}') == 1
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    small = server.predict({"instances": [{"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 2}]})
    assert small.status_code == 200


@pytest.mark.slow
def test_a_stuck_worker_turns_readiness_and_liveness_false(models, start_server):
    server = start_server("--model_dir", str(models["sdxl"]), "--stuck_after", "2", "--grace_period", "1",
                          model_name="stuck", env={"SDSERVE_FAULT_HANG_PROMPT": "hang", "SDSERVE_FAULT_HANG_SECONDS": "15"})
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(server.predict, {"instances": [{"prompt": "hang", "num_inference_steps": 2}]}, timeout=5)
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.url}/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503 and "stuck in one step for over 2 s" in ready.json()["reason"]
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 503
        assert httpx.get(f"{server.url}/v2/models/stuck/ready").status_code == 503
        server.stop()


@pytest.mark.slow
def test_sigterm_drains_then_exits(models, start_server):
    server = start_server("--model_dir", str(models["sdxl"]), "--grace_period", "120", model_name="drain")
    slow = {"instances": [{"prompt": "in flight", "width": 1024, "height": 1024, "num_inference_steps": 60}]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(server.predict, slow)
        time.sleep(1.0)
        queued = pool.submit(server.predict, {"instances": [{"prompt": "queued", "num_inference_steps": 2}]})
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "shutting down"
        late = quick(server)
        assert late.status_code == 503 and "retry-after" in late.headers
        assert not running.done()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert server.proc.wait(30) == 0
    assert "drained; shutting down" in server.log()


def test_fuzzed_requests_never_get_a_5xx(guarded):
    """Property-based fuzzing of the three JSON routes: anything may be refused, nothing may crash."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fields = ["prompt", "negative_prompt", "prompt_2", "width", "height", "num_inference_steps", "guidance_scale",
              "seed", "num_images", "scheduler", "refiner", "denoising_limit", "high_noise_frac", "format",
              "quality", "crops_coords_top_left", "original_size", "n", "size", "output_format", "data", "junk"]
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(0, 300),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
        st.sampled_from(["Euler a", "ensemble", "refine", "png", "jpeg", "64x64", "128x64", "NaN", "-1", "[0, 0]"]),
    )
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)
    instance = st.dictionaries(st.sampled_from(fields), values, max_size=6) | values
    bodies = st.one_of(
        st.fixed_dictionaries({"instances": st.lists(instance, max_size=3)}, optional={"parameters": instance}),
        st.dictionaries(st.sampled_from(fields), values, max_size=6),
        st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
            "name": st.sampled_from(["prompt", "negative_prompt", "input0", "x"]),
            "shape": st.lists(st.integers(-2, 3), max_size=2),
            "datatype": st.sampled_from(["BYTES", "INT32", "FP32"]),
            "data": st.lists(values, max_size=3)}), max_size=3)}, optional={"parameters": st.dictionaries(
                st.sampled_from(fields), scalars, max_size=4)}),
        values,
    )
    # near-valid requests too, so generation itself runs under fuzzing, not only validation
    plausible = st.fixed_dictionaries({"prompt": st.text(max_size=80)}, optional={
        "width": st.sampled_from([64, 128, 256, 100, 512, -8]), "height": st.sampled_from([64, 128, 72]),
        "num_inference_steps": st.integers(0, 4), "seed": st.integers(-2, 2**63), "num_images": st.integers(0, 3),
        "guidance_scale": st.floats(-1, 40), "scheduler": st.sampled_from(["Euler a", "DDIM", "PNDM", "DPM++ SDE Karras"]),
        "negative_prompt": st.text(max_size=20), "format": st.sampled_from(["png", "webp", "jpeg", "bmp"]),
    })
    bodies = st.one_of(bodies, st.fixed_dictionaries({"instances": st.lists(plausible, min_size=1, max_size=2)}), plausible)
    routes = ["/v1/models/guarded:predict", "/v2/models/guarded/infer", "/openai/v1/images/generations"]
    headers = {"Authorization": "Bearer s3cret-key-123"}
    seen = []

    with httpx.Client(base_url=guarded.url, timeout=60, headers=headers) as client:
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(route=st.sampled_from(routes), body=bodies)
        def check(route, body):
            # json.dumps writes NaN/Infinity literals, as careless clients do; httpx would refuse to
            r = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
            seen.append(r.status_code)
            assert r.status_code < 500, (route, body, r.text)

        check()
    assert len(seen) >= 300 and 200 in seen and any(400 <= s < 500 for s in seen)
    assert httpx.get(f"{guarded.url}/v2/health/ready").status_code == 200
