"""sdserve benchmark: in one run, the plain-diffusers baseline, the sdserve engine and the HTTP
server on the same requests; results in bench/results/<device>-<date>.{json,md,log}.

GPU, full-size random-weight SDXL base + refiner (bench/full_size.py), 1024x1024:
    python bench/run.py --device cuda --dtype bfloat16 --compile denoiser --fuse_qkv --channels_last
CPU, tiny models: the server's own overhead, and what concurrent clients gain from batching:
    python bench/run.py --device cpu

Measured (min/median/max over --runs after warm-up):
 1. plain diffusers as existing runtimes call it (float16 StableDiffusionXLPipeline, defaults, batch 1),
    and its own gain from a batch of 4
 2. the sdserve engine on the same request (with the optimisation flags given)
 3. the same through HTTP v1 (a real ``python -m sdserve`` process)
 4. guided UNet iterations/s in sdserve's own loop (and MFU against 13.52 TFLOP per guided SDXL step)
 5. throughput at the MLPerf setting (20 steps, guidance 8) with 1, 4 and 8 concurrent clients
 6. base + refiner ensemble latency   7. peak GPU memory   8. cold start, cold and warm compile caches
 9. step-level scheduling: a short request sent while a long one runs (head-of-line), and clients
    with mixed steps, guidance and samplers against identical ones (steps/s, latency by length)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
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

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import scheduling  # noqa: E402  (bench/ is on the path from here)

GUIDED_STEP_TFLOP = 13.52  # SDXL base UNet, batch 2 (classifier-free guidance), 1024x1024
PEAK_TFLOPS = {"cuda": 790.0}  # dense bf16, H100 SXM (the brief's figure)
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"


LOG: Path | None = None  # the run's raw log, beside its results


def log(*parts) -> None:
    print(*parts, flush=True)
    if LOG is not None:
        with LOG.open("a") as f:
            print(*parts, file=f)


def stats(samples: list[float]) -> dict:
    return {"min": round(min(samples), 4), "median": round(statistics.median(samples), 4),
            "max": round(max(samples), 4), "runs": [round(s, 4) for s in samples]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def unet_iterations_per_s(pipeline, call_kwargs: dict, device: torch.device) -> float:
    """Steps per second inside the denoising loop (text encoding and VAE excluded)."""
    stamps: list[float] = []

    def on_step(pipe, step, timestep, tensors):
        sync(device)
        stamps.append(time.perf_counter())
        return {}

    pipeline(**call_kwargs, callback_on_step_end=on_step)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


# -- 1: plain diffusers ---------------------------------------------------------------------------
def baseline(model_dir: Path, args, device: torch.device) -> dict:
    from diffusers import StableDiffusionXLPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir / "base", torch_dtype=dtype, use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, num_inference_steps=args.steps, width=args.size, height=args.size)
    reset_peak(device)
    samples = time_calls(lambda: pipe(**call).images[0], args.warmup, args.runs, device)
    batch4 = time_calls(lambda: pipe(**call, num_images_per_prompt=4).images, args.warmup, args.runs, device)
    result = {"latency_s": stats(samples), "unet_it_per_s": round(unet_iterations_per_s(pipe, call, device), 3),
              "batch4_latency_s": stats(batch4),
              "batch4_gain": round(4 * statistics.median(samples) / statistics.median(batch4), 3),
              "peak_gpu_gib": peak_memory(device), "dtype": str(dtype)}
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# -- 2 and 4: the engine --------------------------------------------------------------------------
def engine_run(model_dir: Path, args, device: torch.device) -> dict:
    """The engine as the server runs it: one worker thread loads, optimises and runs the step loop."""
    from sdserve import model_store, optimize
    from sdserve.generation import Engine, EngineSettings, ModelBackend
    from sdserve.request import Limits, RequestParser

    dtype = model_store.resolve_dtype(args.dtype, device)
    call = dict(prompt=PROMPT, num_inference_steps=args.steps, width=args.size, height=args.size)
    state: dict = {}

    def prepare() -> ModelBackend:  # on the worker thread
        loaded = model_store.load(model_store.discover(model_dir), device, dtype)
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
    from sdserve.optimize import Optimizations

    return Optimizations(fuse_qkv=args.fuse_qkv, channels_last=args.channels_last, compile=args.compile,
                         compile_mode=args.compile_mode)


# -- 3, 5, 6, 8: the HTTP server ------------------------------------------------------------------
class Server:
    def __init__(self, model_dir: Path, args, cache_dir: Path, log_path: Path, extra: list[str]):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        flags = ["--model_dir", str(model_dir), "--model_name", "sdxl", "--http_port", str(self.port),
                 "--enable_grpc", "false", "--device", args.device, "--dtype", args.dtype,
                 "--compile", args.compile, "--compile_mode", args.compile_mode,
                 "--compile_cache_dir", str(cache_dir), "--max_batch_images", str(args.max_batch_images),
                 "--max_queue", "256", "--enable_latency_logging", "false", *extra]
        if args.fuse_qkv:
            flags.append("--fuse_qkv")
        if args.channels_last:
            flags.append("--channels_last")
        if args.compile != "none":
            flags += ["--warmup", f"{args.size}x{args.size}"]
        self.log_file = open(log_path, "a")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "sdserve", *flags], stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 1800) -> float:
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see its log")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready in time")

    def predict(self, **params) -> float:
        start = time.perf_counter()
        r = httpx.post(f"{self.url}/v1/models/sdxl:predict", json={"instances": [{"prompt": PROMPT, **params}]},
                       timeout=1800)
        r.raise_for_status()
        return time.perf_counter() - start

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log_file.close()


def throughput(server: Server, clients: int, requests_per_client: int, params: dict) -> dict:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda _: server.predict(**params), range(clients * requests_per_client)))
    elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "seconds": round(elapsed, 2),
            "images_per_s": round(len(latencies) / elapsed, 3), "latency_s": stats(latencies)}


def server_run(model_dir: Path, args, out_log: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="sdserve-bench-cache-"))
    server = Server(model_dir, args, cache, out_log, [])
    cold = server.wait_ready()
    same = {"num_inference_steps": args.steps, "width": args.size, "height": args.size, "refiner": "none", "seed": 1}
    result = {"cold_start_s": round(cold, 2)}
    try:
        result["latency_s"] = stats([server.predict(**same) for _ in range(args.warmup + args.runs)][args.warmup:])
        mlperf = {"num_inference_steps": 20, "guidance_scale": 8.0, "width": args.size, "height": args.size,
                  "refiner": "none"}
        result["mlperf"] = [throughput(server, c, args.requests_per_client, mlperf) for c in args.clients]
        if (model_dir / "refiner").is_dir():
            ensemble = {**same, "refiner": "ensemble", "high_noise_frac": 0.8}
            result["ensemble_latency_s"] = stats([server.predict(**ensemble) for _ in range(1 + args.runs)][1:])
        log("9. step-level scheduling ...")
        result["head_of_line"] = scheduling.head_of_line(server, args.size, args.short_steps, args.long_steps, args.runs)
        log(result["head_of_line"])
        result["mixed_traffic"] = scheduling.mixed_traffic(server, args.size, args.mixed_clients,
                                                           args.mixed_requests_per_client, args.mixed_steps)
        log(result["mixed_traffic"])
    finally:
        server.stop()
    if args.compile != "none":  # a restart that finds its compiled kernels in the cache
        again = Server(model_dir, args, cache, out_log, [])
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
    hol, mixed = report["server"]["head_of_line"], report["server"]["mixed_traffic"]
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        ("plain diffusers, median s", report["baseline"]["latency_s"]["median"]),
        ("sdserve engine, median s", report["engine"]["latency_s"]["median"]),
        ("sdserve HTTP v1, median s", report["server"]["latency_s"]["median"]),
        ("HTTP ÷ plain diffusers", report["e2e_ratio_vs_diffusers"]),
        ("HTTP ÷ engine (server overhead)", report["http_over_engine"]),
        ("UNet it/s (plain → sdserve)", f'{report["baseline"]["unet_it_per_s"]} → {report["unet_it_per_s"]}'),
        ("MFU", report.get("mfu")),
        ("throughput, images/s by clients", ", ".join(f'{m["clients"]}: {m["images_per_s"]}' for m in report["server"]["mlperf"])),
        ("best images/s (MLPerf setting)", report["mlperf_images_per_s"]),
        ("base + refiner ensemble, median s", report["server"].get("ensemble_latency_s", {}).get("median")),
        ("diffusers' own gain from a batch of 4", report["baseline"]["batch4_gain"]),
        ("server gain, most clients vs 1 (share of diffusers' batch-of-4 gain)",
         f'{report["concurrency_gain"]} ({report["batch_gain_kept"]})'),
        ("short request sent while a long one runs ÷ alone (head-of-line)",
         f'{hol["ratio"]} ({hol["short_steps"]} vs {hol["long_steps"]} steps)'),
        (f"mixed ÷ identical settings, steps/s ({mixed['mixed']['clients']} clients)",
         f'{mixed["mixed_over_identical"]} ({mixed["mixed"]["steps_per_s"]} / {mixed["identical"]["steps_per_s"]})'),
        ("mixed traffic latency p50 / p99 s, by steps", ", ".join(
            f'{n}: {v["p50"]} / {v["p99"]}' for n, v in mixed["mixed"]["latency_by_steps"].items())),
        ("peak GPU memory GiB (plain / sdserve)", f'{report["baseline"]["peak_gpu_gib"]} / {report["engine"]["peak_gpu_gib"]}'),
        ("cold start s (cold / warm compile cache)", f'{report["server"]["cold_start_s"]} / {report["server"].get("cold_start_warm_cache_s")}'),
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
    parser.add_argument("--phase", choices=["baseline", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--phase_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.size = args.size or (1024 if device.type == "cuda" else 256)
    args.clients = args.clients or ([1, 4, 8] if device.type == "cuda" else [1, 16])
    args.max_batch_images = args.max_batch_images or (8 if device.type == "cuda" else 4)
    args.mixed_requests_per_client = args.mixed_requests_per_client or (3 if device.type == "cuda" else 5)
    if args.phase:  # one measurement in a fresh process (see run_phase)
        result = {"baseline": baseline, "engine": engine_run}[args.phase](args.model_dir, args, device)
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
    log("1. plain diffusers ..."); report["baseline"] = run_phase("baseline", args); log(report["baseline"])
    log("2. sdserve engine ..."); report["engine"] = run_phase("engine", args); log(report["engine"])
    log("3/5/6/8/9. HTTP server ..."); report["server"] = server_run(args.model_dir, args, server_log); log(report["server"])

    base_median = report["baseline"]["latency_s"]["median"]
    report["unet_it_per_s"] = report["engine"]["unet_it_per_s"]
    report["e2e_ratio_vs_diffusers"] = round(report["server"]["latency_s"]["median"] / base_median, 3)
    report["http_over_engine"] = round(report["server"]["latency_s"]["median"] / report["engine"]["latency_s"]["median"], 3)
    report["mlperf_images_per_s"] = max(m["images_per_s"] for m in report["server"]["mlperf"])
    single = report["server"]["mlperf"][0]["images_per_s"]
    report["concurrency_gain"] = round(report["mlperf_images_per_s"] / single, 2)
    report["batch_gain_kept"] = round(report["concurrency_gain"] / report["baseline"]["batch4_gain"], 3)
    report["head_of_line_ratio"] = report["server"]["head_of_line"]["ratio"]
    report["mixed_over_identical"] = report["server"]["mixed_traffic"]["mixed_over_identical"]
    if device.type in PEAK_TFLOPS:
        report["mfu"] = round(report["unet_it_per_s"] * GUIDED_STEP_TFLOP / PEAK_TFLOPS[device.type], 3)
    write_report(report, args.results, stem)
    log(json.dumps({k: report[k] for k in ("e2e_ratio_vs_diffusers", "http_over_engine", "unet_it_per_s",
                                          "mlperf_images_per_s", "concurrency_gain", "batch_gain_kept",
                                          "head_of_line_ratio", "mixed_over_identical")}, indent=2))
    log(f"wrote {args.results / stem}.json, .md, .log and .server.log")
    for raw in (LOG, server_log):  # results are committed: keep this checkout's path out of them
        raw.write_text(raw.read_text().replace(str(ROOT), "."))


if __name__ == "__main__":
    main()
