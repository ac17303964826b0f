"""sdserve benchmark: in one run, the plain-diffusers baseline, the sdserve engine and the HTTP
server on the same requests; results in bench/results/<device>-<date>.{json,md,log}.

GPU, full-size random-weight SDXL base + refiner (bench/full_size.py), 1024x1024:
    python bench/run.py --device cuda --dtype bfloat16 --compile denoiser --fuse_qkv --channels_last
CPU, tiny models: the server's own overhead, and what concurrent clients gain from batching:
    python bench/run.py --device cpu

Measured (min/median/max over --runs after warm-up):
 1. plain diffusers as existing runtimes call it (float16 StableDiffusionXLPipeline, defaults, batch 1),
    and its own gain from a batch of 4 (bench/baseline.py, a process of its own)
 2. the sdserve engine on the same request (with the optimisation flags given)
 3. the same through HTTP v1 (a real ``python -m sdserve`` process), in turn with 1
 4. guided UNet iterations/s in sdserve's own loop (and MFU against 13.52 TFLOP per guided SDXL step)
 5. throughput at the MLPerf setting (20 steps, guidance 8) with 1, 4 and 8 concurrent clients
 6. base + refiner ensemble latency   7. peak GPU memory   8. cold start, cold and warm compile caches
 9. step-level scheduling: a short request sent while a long one runs (head-of-line), and clients
    with mixed steps, guidance and samplers against identical ones (steps/s, latency by length)

Whatever is compared in a ratio is measured in alternation (plain call, server call, ...), so that
a shared machine whose speed drifts over minutes weighs on both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import scheduling  # noqa: E402  (bench/ is on the path from here)
from baseline import PROMPT, Baseline, sync  # noqa: E402
from server import Server, throughput  # noqa: E402

GUIDED_STEP_TFLOP = 13.52  # SDXL base UNet, batch 2 (classifier-free guidance), 1024x1024
PEAK_TFLOPS = {"cuda": 790.0}  # dense bf16, H100 SXM (the brief's figure)
LOG: Path | None = None  # the run's raw log, beside its results


def log(*parts) -> None:
    print(*parts, flush=True)
    if LOG is not None:
        with LOG.open("a") as f:
            print(*parts, file=f)


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


def run_phase(phase: str, args) -> dict:
    """Run one measurement in its own process, as a server would run alone: nothing loaded or
    compiled by another phase (and, on a CPU, no second OpenMP pool) changes its numbers."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [sys.executable, __file__, *sys.argv[1:], "--model_dir", str(args.model_dir), "--phase", phase,
               "--phase_out", str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def write_report(report: dict, results_dir: Path, stem: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    server, baseline, engine = report["server"], report["server"]["baseline"], report["engine"]
    gains, hol, mixed = server["batch_gains"], server["head_of_line"], server["mixed_traffic"]
    rows = [
        ("plain diffusers, median s", baseline["latency_s"]["median"]),
        ("sdserve HTTP v1, median s (same request, in turn)", server["latency_s"]["median"]),
        ("HTTP ÷ plain diffusers", report["e2e_ratio_vs_diffusers"]),
        ("HTTP ÷ the engine time it wraps (server overhead)", report["http_over_engine"]),
        ("sdserve engine alone, median s", engine["latency_s"]["median"]),
        ("UNet it/s (plain → sdserve's loop)", f'{baseline["unet_it_per_s"]} → {report["unet_it_per_s"]}'),
        ("MFU", report.get("mfu")),
        ("throughput, images/s by clients", ", ".join(f'{m["clients"]}: {m["images_per_s"]}' for m in server["mlperf"])),
        ("best images/s (MLPerf setting)", report["mlperf_images_per_s"]),
        ("base + refiner ensemble, median s", server.get("ensemble_latency_s", {}).get("median")),
        (f"gain: diffusers batch of 4 ÷ 1; server {gains['clients']} clients ÷ 1 (in turn)",
         f'{gains["diffusers_batch4_gain"]}; {gains["server_gain"]}'),
        ("share of diffusers' batch gain the server keeps", report["batch_gain_kept"]),
        ("short request sent while a long one runs ÷ alone (head-of-line)",
         f'{hol["ratio"]} ({hol["short_steps"]} vs {hol["long_steps"]} steps)'),
        (f"mixed ÷ identical settings, steps/s ({mixed['mixed']['clients']} clients, in turn)",
         f'{mixed["mixed_over_identical"]} ({mixed["mixed"]["steps_per_s"]} / {mixed["identical"]["steps_per_s"]})'),
        ("mixed traffic latency p50 / p99 s, by steps", ", ".join(
            f'{n}: {v["p50"]} / {v["p99"]}' for n, v in mixed["mixed"]["latency_by_steps"].items())),
        ("peak GPU memory GiB (plain / sdserve)", f'{baseline["peak_gpu_gib"]} / {engine["peak_gpu_gib"]}'),
        ("cold start s (cold / warm compile cache)", f'{server["cold_start_s"]} / {server.get("cold_start_warm_cache_s")}'),
    ]
    lines = [f"# sdserve benchmark: {report['device']} ({report['date']})", "",
             f"torch {report['torch']}, diffusers {report['diffusers']}; {report['workload']}; "
             f"flags: {' '.join(report['flags']) or 'none'}", "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    (results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model_dir", type=Path, help="default: build one (full size on CUDA, tiny on CPU)")
    parser.add_argument("--size", type=int, help="default: 1024 on CUDA, 256 on CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clients", type=int, nargs="+", help="default: 1 4 8 on CUDA, 1 16 on CPU")
    parser.add_argument("--requests_per_client", type=int, default=3)
    parser.add_argument("--max_batch_images", type=int, help="default: 8 on CUDA, 4 (the server's default) on CPU")
    parser.add_argument("--short_steps", type=int, default=4, help="head-of-line: the short request")
    parser.add_argument("--long_steps", type=int, default=60, help="head-of-line: the long request it is sent behind")
    parser.add_argument("--mixed_clients", type=int, default=16)
    parser.add_argument("--mixed_requests_per_client", type=int, help="default: 3 on CUDA, 5 on CPU")
    parser.add_argument("--mixed_steps", type=lambda t: [int(n) for n in t.split(",")], default=[10, 20, 30, 40, 50],
                        help="steps of the mixed clients' requests (identical clients use their mean)")
    parser.add_argument("--fuse_qkv", action="store_true")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", default="none", choices=["none", "denoiser", "all"])
    parser.add_argument("--compile_mode", default="default")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--tag", default="", help="added to the result file names, e.g. 'compiled'")
    parser.add_argument("--gain_rounds", type=int, default=3, help="alternating rounds for the batching gains")
    parser.add_argument("--mixed_rounds", type=int, help="alternating rounds of identical and mixed traffic "
                        "(default: 1 on CUDA, 2 on CPU)")
    parser.add_argument("--phase", choices=["engine"], help=argparse.SUPPRESS)
    parser.add_argument("--phase_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.size = args.size or (1024 if device.type == "cuda" else 256)
    args.clients = args.clients or ([1, 4, 8] if device.type == "cuda" else [1, 16])
    args.max_batch_images = args.max_batch_images or (8 if device.type == "cuda" else 4)
    args.mixed_requests_per_client = args.mixed_requests_per_client or (3 if device.type == "cuda" else 3)
    args.mixed_rounds = args.mixed_rounds or (1 if device.type == "cuda" else 2)
    if args.phase:  # one measurement in a fresh process (see run_phase)
        result = engine_run(args.model_dir, args, device)
        args.phase_out.write_text(json.dumps(result))
        return
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else f"cpu-{platform.machine()}"
    stem = f"{name}-{date}" + (f"-{args.tag}" if args.tag else "")
    args.results.mkdir(parents=True, exist_ok=True)
    server_log = args.results / f"{stem}.server.log"
    server_log.unlink(missing_ok=True)
    global LOG
    LOG = args.results / f"{stem}.log"
    LOG.unlink(missing_ok=True)
    log(f"sdserve bench {' '.join(sys.argv[1:])} on {platform.node() and 'this machine'}: {platform.platform()}")

    if args.model_dir is None:
        args.model_dir = Path(tempfile.mkdtemp(prefix="sdserve-bench-model-"))
        started = time.perf_counter()
        if device.type == "cuda":
            import full_size

            full_size.write(args.model_dir, args.device)
        else:
            from sdserve.tiny import write_tiny_model

            write_tiny_model(args.model_dir, "sdxl-refiner")
        log(f"model written to {args.model_dir} in {time.perf_counter() - started:.0f} s")

    import diffusers

    flags = [f for f in ("--fuse_qkv" if args.fuse_qkv else "", "--channels_last" if args.channels_last else "",
                         f"--compile {args.compile} --compile_mode {args.compile_mode}" if args.compile != "none" else "",
                         f"--dtype {args.dtype}") if f]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
              "date": date, "torch": torch.__version__, "diffusers": diffusers.__version__, "flags": flags,
              "workload": f"SDXL {'full size, random weights' if device.type == 'cuda' else 'tiny'}, "
                          f"{args.size}x{args.size}, {args.steps} steps, batch 1, guidance 5 (MLPerf: 20 steps, guidance 8)"}
    log("2/4/7. sdserve engine ..."); report["engine"] = run_phase("engine", args); log(report["engine"])
    log("HTTP server and plain diffusers ..."); report["server"] = server_run(args.model_dir, args, server_log)
    log(report["server"])

    for key in ("e2e_ratio_vs_diffusers", "http_over_engine"):
        report[key] = report["server"][key]
    report["unet_it_per_s"] = report["engine"]["unet_it_per_s"]
    report["mlperf_images_per_s"] = max(m["images_per_s"] for m in report["server"]["mlperf"])
    report["batch_gain_kept"] = report["server"]["batch_gains"]["batch_gain_kept"]
    report["head_of_line_ratio"] = report["server"]["head_of_line"]["ratio"]
    report["mixed_over_identical"] = report["server"]["mixed_traffic"]["mixed_over_identical"]
    if device.type in PEAK_TFLOPS:
        report["mfu"] = round(report["unet_it_per_s"] * GUIDED_STEP_TFLOP / PEAK_TFLOPS[device.type], 3)
    write_report(report, args.results, stem)
    log(json.dumps({k: report[k] for k in ("e2e_ratio_vs_diffusers", "http_over_engine", "unet_it_per_s",
                                          "mlperf_images_per_s", "batch_gain_kept",
                                          "head_of_line_ratio", "mixed_over_identical")}, indent=2))
    log(f"wrote {args.results / stem}.json, .md, .log and .server.log")
    for raw in (LOG, server_log):  # results are committed: keep this machine's paths out of them
        raw.write_text(raw.read_text().replace(str(ROOT), ".").replace(str(args.model_dir), "<model_dir>"))


if __name__ == "__main__":
    main()
