"""The engine's queue, batcher and worker, driven with a recording batch function."""

import asyncio
import threading
import time

import numpy as np
import pytest

from sdserve.engine import Engine, EngineSettings
from sdserve.errors import DeadlineExceeded, GenerationFailed, ImageTooLarge, Interrupted, QueueFull, ShuttingDown
from sdserve.request import GenerationRequest


def futures(jobs):
    return [job.future for job in jobs]


def req(prompt="x", steps=4, n=1, seed=1) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=64, height=64, num_inference_steps=steps,
                             guidance_scale=5.0, seed=seed, num_images=n)


class Recorder:
    """A batch function that records batches; it can block until released, and fail on a prompt."""

    def __init__(self, block: bool = False, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        if not block:
            self.gate.set()
        self.fail_on = fail_on

    def __call__(self, requests, should_stop=lambda: False):
        self.started.set()
        self.gate.wait(10)
        self.batches.append([r.prompt for r in requests])
        if self.fail_on and any(r.prompt == self.fail_on for r in requests):
            raise RuntimeError(f"cannot draw {self.fail_on}")
        return [[np.zeros((2, 2, 3), np.uint8)] * r.num_images for r in requests]


@pytest.fixture
def engine_factory():
    engines = []

    def make(fn, **settings):
        engine = Engine(fn, EngineSettings(**settings))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=5)


def test_queued_compatible_requests_share_a_batch(engine_factory):
    rec = Recorder(block=True)
    engine = engine_factory(rec, max_batch_images=4)
    first = futures(engine.submit([req("first")], "r0"))
    assert rec.started.wait(5)  # the worker is busy with "first"; the rest queue up
    later = futures(engine.submit([req("a"), req("b", steps=8), req("c", n=2), req("d"), req("e")], "r1"))
    rec.gate.set()
    for f in first + later:
        f.result(5)
    # a, c (2 images), d fill the batch of 4 images; b has other settings; e waits for the next one
    assert rec.batches == [["first"], ["a", "c", "d"], ["b"], ["e"]]
    result = later[2].result()
    assert len(result.images) == 2 and result.seeds == [1, 2] and result.batch_images == 4


def test_wait_window_gathers_requests_that_arrive_shortly_after(engine_factory):
    rec = Recorder()
    engine = engine_factory(rec, max_batch_images=8, max_wait_ms=300)
    waiting = futures(engine.submit([req("a")], "r"))
    time.sleep(0.05)
    waiting += futures(engine.submit([req("b")], "r"))
    for f in waiting:
        f.result(5)
    assert rec.batches == [["a", "b"]]


def test_queue_bound_is_all_or_nothing(engine_factory):
    rec = Recorder(block=True)
    engine = engine_factory(rec, max_queue=2, retry_after_s=7)
    running = futures(engine.submit([req("running")], "r"))
    assert rec.started.wait(5)
    queued = futures(engine.submit([req("q1")], "r"))
    with pytest.raises(QueueFull) as err:
        engine.submit([req("q2"), req("q3")], "r")
    assert err.value.retry_after == 7 and err.value.headers() == {"Retry-After": "7"}
    assert engine.queue_depth == 1  # nothing of the refused request was queued
    rec.gate.set()
    for f in running + queued:
        f.result(5)


def test_a_failing_request_fails_alone_and_the_worker_survives(engine_factory):
    rec = Recorder(block=True, fail_on="bad")
    engine = engine_factory(rec, max_batch_images=4)
    blocker = futures(engine.submit([req("blocker")], "r"))
    assert rec.started.wait(5)
    good, bad, good2 = futures(engine.submit([req("good"), req("bad"), req("good2")], "r"))
    rec.gate.set()
    blocker[0].result(5)
    assert good.result(5).images and good2.result(5).images
    with pytest.raises(GenerationFailed, match="RuntimeError: cannot draw bad"):
        bad.result(5)
    assert engine.alive
    assert engine.submit([req("after")], "r")[0].future.result(5).images


def test_cancelled_requests_are_never_generated(engine_factory):
    rec = Recorder(block=True)
    engine = engine_factory(rec, max_batch_images=1)
    engine.submit([req("busy")], "r")
    assert rec.started.wait(5)
    gone = engine.submit([req("gone")], "r")[0]
    kept = engine.submit([req("kept")], "r")[0]
    gone.abandon()
    rec.gate.set()
    kept.future.result(5)
    assert ["gone"] not in rec.batches


def test_generate_awaits_without_blocking_the_loop(engine_factory):
    rec = Recorder(block=True)
    engine = engine_factory(rec)

    async def scenario():
        task = asyncio.create_task(engine.generate([req("slow")], "r"))
        ticks = 0
        while not rec.started.is_set() or ticks < 5:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not task.done()
        rec.gate.set()
        return await task

    results = asyncio.run(scenario())
    assert len(results) == 1 and results[0].seeds == [1]


def test_stop_fails_queued_work_and_refuses_new(engine_factory):
    rec = Recorder(block=True)
    engine = engine_factory(rec)
    engine.submit([req("running")], "r")
    assert rec.started.wait(5)
    queued = engine.submit([req("queued")], "r")[0].future
    threading.Timer(0.2, rec.gate.set).start()
    engine.stop(timeout=5)
    with pytest.raises(ShuttingDown):
        queued.result(1)
    with pytest.raises(ShuttingDown):
        engine.submit([req("late")], "r")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_batch_images must be at least 1"):
        EngineSettings(max_batch_images=0)
    with pytest.raises(ValueError, match="max_queue must be at least 1"):
        EngineSettings(max_queue=0)


class Stepper:
    """A batch function that runs ``steps`` steps of ``step_s`` seconds, polling should_stop."""

    def __init__(self, steps=50, step_s=0.02):
        self.steps, self.step_s = steps, step_s
        self.steps_run = 0

    def __call__(self, requests, should_stop):
        for _ in range(self.steps):
            if should_stop():
                raise Interrupted()
            time.sleep(self.step_s)
            self.steps_run += 1
        return [[np.zeros((2, 2, 3), np.uint8)] * r.num_images for r in requests]


def test_deadline_passes_while_queued_or_running(engine_factory):
    stepper = Stepper(steps=100, step_s=0.02)  # 2 s of work
    engine = engine_factory(stepper)

    async def scenario():
        with pytest.raises(DeadlineExceeded, match="request deadline passed after 0.3 s"):
            await engine.generate([req("slow")], "r", timeout=0.3)
        started = time.monotonic()
        while engine.busy_seconds() and time.monotonic() - started < 5:
            await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert stepper.steps_run < 40  # stopped at a step soon after the deadline, not after 100 steps
    assert engine.alive and engine.submit([req("next")], "r")[0].future.result(5)


def test_a_disconnected_client_stops_its_batch(engine_factory):
    stepper = Stepper(steps=200, step_s=0.02)
    engine = engine_factory(stepper)

    async def scenario():
        task = asyncio.create_task(engine.generate([req("bye")], "r"))
        await asyncio.sleep(0.3)
        task.cancel()  # what the server does when the HTTP client goes away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert engine.wait_idle(5) and stepper.steps_run < 60


def test_a_batch_keeps_going_while_one_of_its_requests_still_waits(engine_factory):
    stepper = Stepper(steps=20, step_s=0.02)
    engine = engine_factory(stepper, max_batch_images=4, max_wait_ms=200)
    leaving, staying = engine.submit([req("leaving"), req("staying")], "r")
    time.sleep(0.1)
    leaving.abandon()
    assert staying.future.result(5).images and stepper.steps_run == 20


def test_drain_finishes_queued_work_and_refuses_new(engine_factory):
    engine = engine_factory(Stepper(steps=10, step_s=0.02), max_batch_images=1)
    jobs = engine.submit([req("a"), req("b"), req("c")], "r")
    engine.drain()
    with pytest.raises(ShuttingDown):
        engine.submit([req("late")], "r")
    assert engine.wait_idle(5)
    assert all(job.future.result(0).images for job in jobs)


def test_busy_seconds_measures_the_running_batch(engine_factory):
    rec = Recorder(block=True)
    engine = engine_factory(rec)
    assert engine.busy_seconds() == 0
    engine.submit([req("x")], "r")
    assert rec.started.wait(5)
    time.sleep(0.3)
    assert engine.busy_seconds() >= 0.3
    rec.gate.set()
    assert engine.wait_idle(5) and engine.busy_seconds() == 0


def test_image_too_large_fails_the_whole_batch_without_retries(engine_factory):
    calls = []

    def too_large(requests, should_stop):
        calls.append(len(requests))
        raise ImageTooLarge("out of accelerator memory generating one 64x64 image")

    engine = engine_factory(too_large, max_batch_images=4, max_wait_ms=100)
    jobs = engine.submit([req("a"), req("b")], "r")
    for job in jobs:
        with pytest.raises(ImageTooLarge):
            job.future.result(5)
    assert calls == [2]
