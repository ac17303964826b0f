"""The benchmark's measurements (used by run.py): the sdserve engine in this process (2, 4, 7), and
the HTTP server alternating with plain diffusers on the same requests (1, 3, 5, 6, 8, 9); the
numbers are those of run.py's docstring."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import scheduling
import torch
from baseline import PROMPT, Baseline, sync
from report import log

from server import Server, throughput


def stats(samples: list[float]) -> dict:
    return {"min": round(min(samples), 4), "median": round(statistics.median(samples), 4),
            "max": round(max(samples), 4), "runs": [round(s, 4) for s in samples]}


def peak_memory(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_calls(fn, warmup: int, runs: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


# -- 2 and 4: the engine --------------------------------------------------------------------------
def engine_run(model_dir: Path, args, device: torch.device) -> dict:
    """The engine as the server runs it: one worker thread loads, optimises and runs the step loop."""
    from sdserve.generation import Engine, EngineSettings, ModelBackend
    from sdserve.models import loading, optimize
    from sdserve.models.layout import discover
    from sdserve.request.types import Limits
    from sdserve.request.validation import RequestParser

    dtype = loading.resolve_dtype(args.dtype, device)
    call = dict(prompt=PROMPT, num_inference_steps=args.steps, width=args.size, height=args.size)
    state: dict = {}

    def prepare() -> ModelBackend:  # on the worker thread
        loaded = loading.load(discover(model_dir), device, dtype)
        opts = optimizations(args)
        state["done"] = optimize.apply(loaded.base, opts)
        state["parser"] = RequestParser(Limits(max_steps=100), loaded.capabilities)
        return ModelBackend(loaded, pad_rows=opts.compile != "none")

    engine = Engine(EngineSettings(max_batch_images=args.max_batch_images))
    engine.start(prepare).result()
    request = state["parser"].parse({**call, "refiner": "none", "seed": 1})
    started = time.perf_counter()
    asyncio.run(engine.generate([request], "bench"))  # warm-up (compiles, when compiling)
    first_call_s = round(time.perf_counter() - started, 2)
    stamps: list[float] = []

    def on_step(progress) -> None:  # on the worker thread, after each step
        sync(device)
        stamps.append(time.perf_counter())

    asyncio.run(engine.generate([request], "bench", on_progress=on_step))
    reset_peak(device)
    samples = time_calls(lambda: asyncio.run(engine.generate([request], "bench")), args.warmup, args.runs, device)
    engine.stop(timeout=60)
    return {
        "latency_s": stats(samples),
        "unet_it_per_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 3),
        "peak_gpu_gib": peak_memory(device),
        "dtype": str(dtype),
        "optimisations": state["done"],
        "first_call_s": first_call_s,
    }


def optimizations(args):
    from sdserve.models.optimize import Optimizations

    return Optimizations(fuse_qkv=args.fuse_qkv, channels_last=args.channels_last, compile=args.compile,
                         compile_mode=args.compile_mode)


# -- 1, 3, 5, 6, 8, 9: the HTTP server, alternating with plain diffusers ------------------------------
def settle(args) -> None:
    """On a CPU, let the other process's OpenMP threads stop spinning before timing this one."""
    if args.device == "cpu":
        time.sleep(0.3)


def against_diffusers(baseline: Baseline, server: Server, args) -> dict:
    """1 and 3: plain diffusers and the server on the same request, one call each in turn."""
    same = {"num_inference_steps": args.steps, "width": args.size, "height": args.size, "refiner": "none", "seed": 1}
    plain, http, overhead, last = [], [], [], {}
    for i in range(args.warmup + args.runs):
        last = baseline.call(args.steps)
        settle(args)
        latency, timings = server.predict_timed(**same)
        settle(args)
        if i >= args.warmup:
            plain.append(last["seconds"])
            http.append(latency)
            overhead.append(latency / (timings["queue_s"] + timings["generate_s"]))
    return {"baseline": {"latency_s": stats(plain), "unet_it_per_s": round(last["unet_it_per_s"], 3),
                         "peak_gpu_gib": last["peak_gpu_gib"], "dtype": baseline.info["dtype"]},
            "latency_s": stats(http), "http_over_engine": round(statistics.median(overhead), 3),
            "e2e_ratio_vs_diffusers": round(statistics.median(http) / statistics.median(plain), 3)}


def batch_gains(baseline: Baseline, server: Server, args) -> dict:
    """What a batch of 4 gains plain diffusers, and what the most concurrent clients gain the server
    over one (MLPerf setting), measured in alternating rounds."""
    mlperf = {"num_inference_steps": 20, "guidance_scale": 8.0, "width": args.size, "height": args.size,
              "refiner": "none"}
    one, four = [], []
    served = {1: [0, 0.0], max(args.clients): [0, 0.0]}  # clients -> [images, seconds]
    for _ in range(args.gain_rounds):
        one.append(baseline.call(20, 8.0, 1)["seconds"])
        four.append(baseline.call(20, 8.0, 4)["seconds"])
        for clients, total in served.items():
            settle(args)
            run = throughput(server, clients, args.requests_per_client, mlperf)
            total[0] += run["requests"]
            total[1] += run["seconds"]
        settle(args)
    diffusers_gain = 4 * statistics.median(one) / statistics.median(four)
    rate = {clients: images / seconds for clients, (images, seconds) in served.items()}
    server_gain = rate[max(args.clients)] / rate[1]
    return {"diffusers_batch4_gain": round(diffusers_gain, 3), "server_gain": round(server_gain, 3),
            "clients": max(args.clients), "rounds": args.gain_rounds,
            "batch_gain_kept": round(server_gain / diffusers_gain, 3)}


def server_run(model_dir: Path, args, out_log: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="sdserve-bench-cache-"))
    baseline = Baseline(model_dir, args.device, args.size)
    server = Server(model_dir, args, cache, out_log)
    result = {"cold_start_s": round(server.wait_ready(), 2)}
    try:
        log("1/3. plain diffusers and the server, in turn ...")
        result.update(against_diffusers(baseline, server, args))
        log("5. throughput (MLPerf setting) ...")
        result["batch_gains"] = batch_gains(baseline, server, args)
        mlperf = {"num_inference_steps": 20, "guidance_scale": 8.0, "width": args.size, "height": args.size,
                  "refiner": "none"}
        result["mlperf"] = []
        for clients in args.clients:
            run = throughput(server, clients, args.requests_per_client, mlperf)
            run["latency_s"] = stats(run.pop("latencies"))
            result["mlperf"].append(run)
        if (model_dir / "refiner").is_dir():
            ensemble = {"num_inference_steps": args.steps, "width": args.size, "height": args.size, "seed": 1,
                        "refiner": "ensemble", "high_noise_frac": 0.8}
            result["ensemble_latency_s"] = stats([server.predict(**ensemble) for _ in range(1 + args.runs)][1:])
        log("9. step-level scheduling ...")
        result["head_of_line"] = scheduling.head_of_line(server, args.size, args.short_steps, args.long_steps, args.runs)
        log(result["head_of_line"])
        result["mixed_traffic"] = scheduling.mixed_traffic(server, args.size, args.mixed_clients,
                                                           args.mixed_requests_per_client, args.mixed_steps,
                                                           args.mixed_rounds)
        log(result["mixed_traffic"])
    finally:
        server.stop()
        baseline.stop()
    if args.compile != "none":  # a restart that finds its compiled kernels in the cache
        again = Server(model_dir, args, cache, out_log)
        result["cold_start_warm_cache_s"] = round(again.wait_ready(), 2)
        again.stop()
    return result
