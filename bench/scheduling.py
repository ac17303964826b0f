"""Step-level scheduling under load, over HTTP against a real server (used by run.py):

* head-of-line: a short request sent while a long one runs, against the short one alone;
* mixed traffic: concurrent clients whose steps, guidance and samplers all differ, against the
  same clients with identical settings: denoising steps/s, and latency by request length.

What is compared is measured in alternation, so that a machine whose speed drifts (a shared CPU)
weighs on both sides alike.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import statistics
import threading
import time

# First-order samplers only: a denoiser call per step, so steps/s compare like with like.
MIXED_SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "LMS", "DEIS"]
MIXED_GUIDANCE = [3.0, 5.0, 7.5, 9.0]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))], 4)


def head_of_line(server, size: int, short_steps: int, long_steps: int, runs: int) -> dict:
    """Latency of a ``short_steps`` request alone, and sent while a ``long_steps`` one runs."""
    common = {"width": size, "height": size, "refiner": "none", "seed": 1}
    server.predict(num_inference_steps=short_steps, **common)
    long_alone = server.predict(num_inference_steps=long_steps, **common)
    alone, behind, long_latencies = [], [], []
    for _ in range(runs):
        alone.append(server.predict(num_inference_steps=short_steps, **common))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(server.predict, num_inference_steps=long_steps, **common)
            time.sleep(0.25 * long_alone)  # well inside the long request's denoising
            behind.append(server.predict(num_inference_steps=short_steps, **common))
            long_latencies.append(running.result())
    ratio = statistics.median(behind) / statistics.median(alone)
    return {"short_steps": short_steps, "long_steps": long_steps, "short_alone_s": round(statistics.median(alone), 4),
            "short_behind_long_s": round(statistics.median(behind), 4), "long_s": round(statistics.median(long_latencies), 4),
            "ratio": round(ratio, 3)}


def _traffic(server, clients: int, requests_per_client: int, plan, totals: dict) -> None:
    """``clients`` threads each send ``requests_per_client`` requests (``plan(client, i)`` gives
    one); adds steps, seconds and latencies by steps to ``totals``."""
    lock = threading.Lock()

    def client(c: int) -> int:
        steps = 0
        for i in range(requests_per_client):
            params = plan(c, i)
            latency = server.predict(**params)
            with lock:
                totals["latencies"].setdefault(params["num_inference_steps"], []).append(latency)
            steps += params["num_inference_steps"]
        return steps

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        totals["steps"] += sum(pool.map(client, range(clients)))
    totals["seconds"] += time.perf_counter() - start
    totals["requests"] += clients * requests_per_client


def _summary(totals: dict, clients: int) -> dict:
    return {"clients": clients, "requests": totals["requests"], "seconds": round(totals["seconds"], 2),
            "steps_per_s": round(totals["steps"] / totals["seconds"], 2),
            "latency_by_steps": {n: {"p50": percentile(v, 50), "p99": percentile(v, 99), "requests": len(v)}
                                 for n, v in sorted(totals["latencies"].items())}}


def mixed_traffic(server, size: int, clients: int, requests_per_client: int, steps: list[int], rounds: int) -> dict:
    """The same clients with identical settings, then with mixed steps, guidance and samplers (the
    mixed steps average the identical ones'), alternating for ``rounds`` rounds on one server."""
    common = {"width": size, "height": size, "refiner": "none"}
    mean_steps = round(statistics.mean(steps))
    cycle = list(itertools.product(steps, MIXED_GUIDANCE, MIXED_SAMPLERS))
    identical = {"steps": 0, "seconds": 0.0, "requests": 0, "latencies": {}}
    mixed = {"steps": 0, "seconds": 0.0, "requests": 0, "latencies": {}}
    for r in range(rounds):
        _traffic(server, clients, requests_per_client,
                 lambda c, i: {**common, "num_inference_steps": mean_steps, "guidance_scale": 5.0,
                               "scheduler": "Euler", "seed": c * 100 + i}, identical)
        _traffic(server, clients, requests_per_client,
                 lambda c, i: {**common, "num_inference_steps": steps[(c + i + r) % len(steps)],
                               "guidance_scale": cycle[(7 * c + i) % len(cycle)][1],
                               "scheduler": cycle[(3 * c + 5 * i + r) % len(cycle)][2], "seed": c * 100 + i}, mixed)
    identical, mixed = _summary(identical, clients), _summary(mixed, clients)
    return {"identical": identical, "mixed": mixed, "rounds": rounds,
            "mixed_over_identical": round(mixed["steps_per_s"] / identical["steps_per_s"], 3)}
