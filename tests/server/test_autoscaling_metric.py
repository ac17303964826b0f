"""The gauges the KEDA manifest scales on: ``sdserve_images_pending`` (images received and not yet
answered, queued ones included) rises under load past what one denoiser call holds and returns to 0
on every way a request ends; ``sdserve_image_capacity`` is ``--max_batch_images``. Against a real
server, and in-process for the shutdown paths that end the server."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import pytest
from prometheus_client import REGISTRY

from helpers.oracle import LocalEngine
from sdserve.errors import DeadlineExceeded, ShuttingDown

MAX_BATCH = 2
IMAGES_EACH = 2
CLIENTS = 4  # 8 images for a loop that holds 2 at a time: most of them wait in the queue
# Enough steps that the requests overlap for a second or more on 2 CPU cores; tiny images keep it quick.
LOAD = {"prompt": "load", "num_inference_steps": 16, "width": 64, "height": 64, "num_images": IMAGES_EACH}
# never finishes within the test (500 steps of 256x256: tens of seconds): its client hangs up
SLOW = {**LOAD, "num_inference_steps": 500, "width": 256, "height": 256}


def scrape(server) -> dict[str, float]:
    """sdserve's unlabelled gauges, name -> value."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {name: float(value) for name, value in re.findall(r"^(sdserve_\w+) (\S+)$", text, re.MULTILINE)}


def wait_for_zero(server, timeout: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (gauges := scrape(server))["sdserve_images_pending"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return gauges


@pytest.fixture(scope="module")
def server(models, start_server):
    # --max_active_images = --max_batch_images: one call's worth in the loop, the rest queued.
    # One torch thread: tiny images gain nothing from more, and OpenMP threads that spin-wait for one
    # another slow down many times over when other processes share the 2 cores.
    started = start_server("--model_dir", str(models["sd"]), "--max_batch_images", str(MAX_BATCH),
                           "--max_active_images", str(MAX_BATCH), "--max_steps", "500", model_name="autoscale",
                           env={"OMP_NUM_THREADS": "1"})
    # The first request pays one-off costs (seconds); the tests time the steady state.
    assert started.predict({"instances": [{**LOAD, "num_inference_steps": 2}]}).status_code == 200
    return started


def test_pending_images_count_queued_ones_and_return_to_zero(server):
    gauges = scrape(server)
    assert gauges["sdserve_image_capacity"] == MAX_BATCH
    assert gauges["sdserve_images_pending"] == 0
    samples = []
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        answers = [pool.submit(server.predict, {"instances": [LOAD]}) for _ in range(CLIENTS)]
        while not all(answer.done() for answer in answers):
            samples.append(scrape(server))
            time.sleep(0.2)  # a scrape takes the server's CPU (and GIL) too: not back to back
    assert all(answer.result().status_code == 200 for answer in answers)
    pending = [s["sdserve_images_pending"] for s in samples]
    # More than the loop can hold: images still waiting for admission are counted.
    assert max(pending) > MAX_BATCH, pending
    assert max(pending) <= CLIENTS * IMAGES_EACH
    assert any(s["sdserve_queue_depth"] > 0 and s["sdserve_images_pending"] > s["sdserve_active_images"]
               for s in samples)
    assert all(value % 1 == 0 and value >= 0 for value in pending)
    after = scrape(server)
    assert after["sdserve_images_pending"] == 0 and after["sdserve_active_images"] == 0


def test_pending_images_return_to_zero_after_rejections_deadlines_and_hang_ups(server):
    # 400: rejected before it is queued, never counted
    bad = server.predict({"instances": [{**LOAD, "num_inference_steps": -1}]})
    assert bad.status_code == 400
    assert scrape(server)["sdserve_images_pending"] == 0
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        # a client that gives up while its images are being generated ...
        running = pool.submit(server.predict, {"instances": [SLOW]}, timeout=4)
        time.sleep(0.5)
        # ... one that hangs up while its request waits behind it ...
        queued = pool.submit(server.predict, {"instances": [SLOW]}, timeout=3)
        # ... and one whose deadline passes in the queue (504)
        expired = pool.submit(server.predict, {"instances": [LOAD]}, headers={"x-request-timeout": "2.5"})
        seen = [scrape(server)["sdserve_images_pending"]]
        until = time.monotonic() + 2.0  # all three have arrived by then, and none has given up yet
        while seen[-1] < 3 * IMAGES_EACH and time.monotonic() < until:
            time.sleep(0.1)
            seen.append(scrape(server)["sdserve_images_pending"])
        assert seen[-1] == 3 * IMAGES_EACH, seen
        for hung_up in (running, queued):
            with pytest.raises(httpx.ReadTimeout):
                answer = hung_up.result()
                pytest.fail(f"answered before its client gave up: {answer.status_code} {answer.text[:300]}")
        assert expired.result().status_code == 504
    gauges = wait_for_zero(server)
    assert gauges["sdserve_images_pending"] == 0 and gauges["sdserve_active_images"] == 0
    assert server.predict({"instances": [LOAD]}).status_code == 200  # and the server still serves
    assert scrape(server)["sdserve_images_pending"] == 0


# In-process: the pending gauge is process-wide, so these compare with its value before.

def pending() -> float:
    return REGISTRY.get_sample_value("sdserve_images_pending")


@pytest.fixture
def local_engine(models):
    engine = LocalEngine(models["sd"], max_batch_images=1, max_active_images=1)
    yield engine
    engine.close()


def test_stop_fails_queued_and_running_work_and_the_gauge_returns(local_engine):
    before = pending()
    assert REGISTRY.get_sample_value("sdserve_image_capacity") == 1
    running, queued = local_engine.submit({**SLOW, "num_inference_steps": 100, "num_images": 1}, LOAD)
    assert pending() == before + 1 + IMAGES_EACH
    time.sleep(0.3)
    local_engine.engine.stop(timeout=30)
    for job in (running, queued):
        with pytest.raises(ShuttingDown):
            job.future.result(5)
    assert pending() == before


def test_drain_finishes_queued_work_and_the_gauge_returns(local_engine):
    before = pending()
    jobs = local_engine.submit(LOAD, LOAD)
    local_engine.engine.drain()
    assert local_engine.engine.wait_idle(60)
    assert all(job.future.result(0).images for job in jobs)
    assert pending() == before


def test_a_job_cancelled_while_queued_leaves_the_gauge_at_once(local_engine):
    before = pending()
    running, queued = local_engine.submit({**SLOW, "num_inference_steps": 100}, LOAD)
    queued.abandon()  # still in the queue: its future is cancelled now
    assert queued.future.cancelled() and pending() == before + IMAGES_EACH
    running.abandon()  # in the loop: it leaves at the next step
    with pytest.raises(DeadlineExceeded):
        running.future.result(30)
    assert pending() == before
