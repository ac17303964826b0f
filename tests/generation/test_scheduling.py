"""The step-level scheduling targets, as ratios measured in one run (with margin: 2 CPU cores are
noisy; bench/run.py measures the same over HTTP with more requests)."""

import concurrent.futures
import statistics
import threading
import time

import pytest

from helpers.oracle import LocalEngine

SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "LMS", "DEIS"]  # first order

SIZE = {"width": 128, "height": 128}


@pytest.fixture(scope="module")
def engine(models):
    engine = LocalEngine(models["sdxl"], max_batch_images=4)
    yield engine
    engine.close()


def latency(engine, values, on_progress=None) -> float:
    start = time.perf_counter()
    (job,) = engine.submit(values, on_progress=on_progress)
    job.future.result(120)
    return time.perf_counter() - start


def test_a_short_request_sent_while_a_long_one_runs_is_not_held_up(engine):
    short = {"prompt": "short", "seed": 1, "num_inference_steps": 4, **SIZE}
    long = {"prompt": "long", "seed": 2, "num_inference_steps": 60, **SIZE}
    latency(engine, short)
    alone = statistics.median(latency(engine, short) for _ in range(5))
    behind = []
    for _ in range(3):
        running = threading.Event()
        (long_job,) = engine.submit(long, on_progress=lambda p: p.step >= 5 and running.set())
        assert running.wait(60)
        behind.append(latency(engine, short))
        assert not long_job.future.done()  # the short one finished first
        long_job.future.result(120)
    ratio = statistics.median(behind) / alone
    # target 2.5 (a shared step costs nearly two single steps on 2 CPU cores); the old engine: 12
    assert ratio <= 3.0, (ratio, alone, behind)


def run_clients(engine, plan, clients=16, requests_per_client=2) -> tuple[int, float]:
    """``clients`` threads each send ``requests_per_client`` requests one after the other;
    returns the denoising steps done and the seconds taken."""
    def client(c):
        steps = 0
        for i in range(requests_per_client):
            values = plan(c, i)
            (job,) = engine.submit(values)
            job.future.result(300)
            steps += values["num_inference_steps"]
        return steps

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        steps = sum(pool.map(client, range(clients)))
    return steps, time.perf_counter() - start


@pytest.mark.slow
def test_mixed_settings_share_the_gpu_as_well_as_identical_ones(engine):
    """256²: at smaller sizes the samplers' own per-image arithmetic, not the denoiser, sets the pace."""
    size = {"width": 256, "height": 256}
    steps = [4, 8, 12, 16, 20]
    guidance = [3.0, 5.0, 7.5, 9.0]
    plans = {
        "identical": lambda c, i: {"prompt": "x", "seed": c, "num_inference_steps": 12, "guidance_scale": 5.0,
                                   "scheduler": "Euler", **size},
        "mixed": lambda c, i: {"prompt": "x", "seed": c, "num_inference_steps": steps[(c + i) % len(steps)],
                               "guidance_scale": guidance[(c + 3 * i) % len(guidance)],
                               "scheduler": SAMPLERS[(c + 5 * i) % len(SAMPLERS)], **size},
    }
    # warm-up, not counted: the new size, and each sampler's first use of a schedule (LMS computes
    # its coefficients once per schedule)
    run_clients(engine, plans["identical"], requests_per_client=1)
    run_clients(engine, plans["mixed"])
    done = {name: [0, 0.0] for name in plans}
    for _ in range(2):  # in alternation: a shared CPU's speed drifts over minutes
        for name, plan in plans.items():
            steps_done, seconds = run_clients(engine, plan)
            done[name][0] += steps_done
            done[name][1] += seconds
    identical, mixed = (steps_done / seconds for steps_done, seconds in done.values())
    # target 0.9 (bench/run.py); the old engine, which batched identical settings only: 0.59
    assert mixed / identical >= 0.8, (mixed, identical)
