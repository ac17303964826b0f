"""The engine around the step loop: queue bound, cancellation, deadlines, drain, stop, failures
that stay with their request, and the watchdog's measure. Real tiny model, real worker thread."""

import asyncio
import shutil
import threading
import time

import pytest

from helpers.oracle import LocalEngine
from sdserve.errors import DeadlineExceeded, GenerationFailed, QueueFull, ShuttingDown
from sdserve.generation import EngineSettings

QUICK = {"prompt": "quick", "num_inference_steps": 2, "width": 64, "height": 64}
SLOW = {"prompt": "slow", "num_inference_steps": 100, "width": 256, "height": 256}


@pytest.fixture
def engine_factory(models):
    made = []

    def make(kind="sdxl", **settings):
        engine = LocalEngine(models[kind], **settings)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def started(engine, values):
    """Submit ``values`` and wait until its first step is done."""
    first = threading.Event()
    (job,) = engine.submit(values, on_progress=lambda p: first.set())
    assert first.wait(30)
    return job


def test_queue_bound_is_all_or_nothing(engine_factory):
    engine = engine_factory(max_batch_images=1, max_active_images=1, max_queue=2, retry_after_s=7)
    running = started(engine, SLOW)
    (queued,) = engine.submit(QUICK)
    with pytest.raises(QueueFull) as err:
        engine.submit(QUICK, QUICK)
    assert err.value.retry_after == 7 and err.value.headers() == {"Retry-After": "7"}
    assert engine.engine.queue_depth == 1  # nothing of the refused request was queued
    assert engine.engine.queue_position(queued) == 0
    running.abandon()
    assert queued.future.result(30).images


def test_requests_are_admitted_while_others_run_up_to_the_active_limit(engine_factory):
    engine = engine_factory(max_batch_images=2, max_active_images=2)
    running = started(engine, SLOW)
    jobs = engine.submit(QUICK, {**QUICK, "num_images": 2}, QUICK)
    time.sleep(1.0)
    # the first quick one joined the slow one; the pair does not fit beside it, and the one behind
    # it waits its turn (first come, first admitted)
    assert jobs[0].future.done() and not jobs[1].future.done() and engine.engine.queue_depth == 2
    running.abandon()
    assert all(job.future.result(30).images for job in jobs)


def test_cancelled_requests_are_never_generated_and_running_ones_stop(engine_factory):
    engine = engine_factory(max_batch_images=1, max_active_images=1)
    steps = []
    (running,) = engine.submit(SLOW, on_progress=lambda p: steps.append(p.step))
    while not steps:
        time.sleep(0.01)
    gone, kept = engine.submit(QUICK, QUICK)
    gone.abandon()
    running.abandon()
    assert kept.future.result(30).images and gone.future.cancelled()
    assert len(steps) < 50  # stopped at a step soon after, not after 100 steps
    with pytest.raises(DeadlineExceeded):
        running.future.result(0)


def test_deadline_passes_while_queued_or_running(engine_factory):
    engine = engine_factory()

    async def scenario():
        with pytest.raises(DeadlineExceeded, match="request deadline passed after 0.5 s"):
            await engine.engine.generate([engine.parse(SLOW)], "r", timeout=0.5)

    asyncio.run(scenario())
    assert engine.engine.wait_idle(5) and engine.images(QUICK)


def test_generate_awaits_without_blocking_the_event_loop(engine_factory):
    engine = engine_factory()

    async def scenario():
        task = asyncio.create_task(engine.engine.generate([engine.parse({**SLOW, "num_inference_steps": 20})], "r"))
        ticks = 0
        while not task.done():
            await asyncio.sleep(0.01)
            ticks += 1
        return ticks, await task

    ticks, results = asyncio.run(scenario())
    assert ticks > 10 and len(results) == 1 and results[0].images[0].shape == (256, 256, 3)


def test_a_request_that_breaks_fails_alone_and_the_worker_survives(engine_factory, models, tmp_path):
    from sdserve.adapters import Adapters

    model = tmp_path / "model"
    shutil.copytree(models["sdxl-loras"], model)
    engine = engine_factory("sdxl-loras", adapters=Adapters(model / "loras", rescan_seconds=0))
    (model / "loras" / "broken").mkdir()
    (model / "loras" / "broken" / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    good, bad, good2 = engine.submit(QUICK, {**QUICK, "loras": ["broken"]}, {**QUICK, "loras": ["trex"]})
    with pytest.raises(GenerationFailed, match="LoRA adapter broken .* does not fit this model"):
        bad.future.result(30)
    assert good.future.result(30).images and good2.future.result(30).images
    assert engine.engine.alive and engine.images(QUICK)


def test_stop_fails_queued_and_running_work_and_refuses_new(engine_factory):
    engine = engine_factory(max_batch_images=1, max_active_images=1)
    running = started(engine, SLOW)
    (queued,) = engine.submit(QUICK)
    engine.engine.stop(timeout=30)
    for job in (running, queued):
        with pytest.raises(ShuttingDown):
            job.future.result(1)
    with pytest.raises(ShuttingDown):
        engine.submit(QUICK)


def test_drain_finishes_queued_work_and_refuses_new(engine_factory):
    engine = engine_factory(max_batch_images=1, max_active_images=1)
    jobs = engine.submit(QUICK, QUICK, QUICK)
    engine.engine.drain()
    with pytest.raises(ShuttingDown):
        engine.submit(QUICK)
    assert engine.engine.wait_idle(30)
    assert all(job.future.result(0).images for job in jobs)


def test_busy_seconds_measures_one_step_not_the_whole_request(engine_factory):
    from sdserve.generation.faults import Faults

    engine = engine_factory(faults=Faults(hang_prompt="hang", hang_seconds=1.0))
    assert engine.engine.busy_seconds() == 0
    (job,) = engine.submit({**QUICK, "prompt": "hang"})
    time.sleep(0.5)
    assert engine.engine.busy_seconds() >= 0.3  # inside the hanging first step
    job.future.result(30)
    assert engine.engine.wait_idle(5) and engine.engine.busy_seconds() == 0


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_batch_images must be at least 1"):
        EngineSettings(max_batch_images=0)
    with pytest.raises(ValueError, match="max_active_images must be at least 1"):
        EngineSettings(max_active_images=0)
    with pytest.raises(ValueError, match="max_queue must be at least 1"):
        EngineSettings(max_queue=0)
    assert EngineSettings(max_batch_images=3).active_limit == 12
