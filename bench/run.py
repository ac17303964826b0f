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
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from measure import engine_run, server_run  # noqa: E402  (bench/ is on the path from here)
from report import log, start_log, write_report  # noqa: E402

GUIDED_STEP_TFLOP = 13.52  # SDXL base UNet, batch 2 (classifier-free guidance), 1024x1024
PEAK_TFLOPS = {"cuda": 790.0}  # dense bf16, H100 SXM (the brief's figure)


def run_phase(phase: str, args) -> dict:
    """Run one measurement in its own process, as a server would run alone: nothing loaded or
    compiled by another phase (and, on a CPU, no second OpenMP pool) changes its numbers."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [sys.executable, __file__, *sys.argv[1:], "--model_dir", str(args.model_dir), "--phase", phase,
               "--phase_out", str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


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
    log_path = start_log(args.results / f"{stem}.log")
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
    for raw in (log_path, server_log):  # results are committed: keep this machine's paths out of them
        raw.write_text(raw.read_text().replace(str(ROOT), ".").replace(str(args.model_dir), "<model_dir>"))


if __name__ == "__main__":
    main()
