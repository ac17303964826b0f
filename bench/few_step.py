"""Few-step generation, over HTTP against a real server, in one run:

* a request without classifier-free guidance (guidance 1.0: one denoiser row per image, no
  negative prompt encoded) against the same request with guidance 7, at the same steps, and per
  denoising step (from the same pair at twice the steps: what every request pays once cancels);
* a 4-step LCM request (guidance 1.0, as LCM-LoRA runs) against the 30-step default request.

Each pair is measured in alternation, request by request, so a machine whose speed drifts weighs on
both sides alike; the medians' ratios are reported. Tiny random weights on a CPU measure sdserve's
side of it (denoiser rows and calls); on a GPU, full-size SDXL shows what users get:

    python bench/few_step.py --device cpu                       # tiny SDXL, 256x256
    python bench/few_step.py --device cuda --model_dir DIR      # e.g. bench/full_size.py's model

Results: bench/results/few-step-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from server import Server  # noqa: E402  (bench/ is on the path from here)


def alternate(server: Server, pairs: dict[str, tuple[dict, dict]], runs: int) -> dict:
    """Median latency of each side of each pair, the two sides sent in turn ``runs`` times."""
    out = {}
    for name, (fast, slow) in pairs.items():
        server.predict(**fast), server.predict(**slow)  # warm-up: first calls of a shape are slower
        fast_s, slow_s = [], []
        for _ in range(runs):
            fast_s.append(server.predict(**fast))
            slow_s.append(server.predict(**slow))
        fast_m, slow_m = statistics.median(fast_s), statistics.median(slow_s)
        out[name] = {"fast": fast, "slow": slow, "fast_s": round(fast_m, 4), "slow_s": round(slow_m, 4),
                     "ratio": round(fast_m / slow_m, 3), "fast_samples": fast_s, "slow_samples": slow_s}
        print(name, out[name]["ratio"], f"({fast_m:.3f} s / {slow_m:.3f} s)", flush=True)
    return out


def server_bench_arguments(description: str, steps: int, steps_help: str | None = None) -> argparse.Namespace:
    """The command line of a bench that compares requests to one plain server (this one and
    step_savings.py): device, model, size, steps, runs; the server's speed flags off."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model_dir", type=Path, help="default: a tiny SDXL model")
    parser.add_argument("--size", type=int, help="default: 1024 on CUDA, 256 on CPU")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max_batch_images", type=int, default=4)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.size = args.size or (1024 if args.device == "cuda" else 256)
    args.compile, args.compile_mode, args.fuse_qkv, args.channels_last = "none", "default", False, False
    return args


def main() -> None:
    args = server_bench_arguments(__doc__.split("\n\n")[0], 20, "steps of the guidance pair")
    if args.model_dir is None:
        from sdserve.tiny import write_tiny_model

        args.model_dir = write_tiny_model(Path(tempfile.mkdtemp(prefix="sdserve-bench-model-")), "sdxl")
    common = {"width": args.size, "height": args.size, "refiner": "none", "seed": 1}
    pairs = {
        "guidance 1.0 ÷ guidance 7, same steps": (
            {**common, "num_inference_steps": args.steps, "guidance_scale": 1.0},
            {**common, "num_inference_steps": args.steps, "guidance_scale": 7.0}),
        "guidance 1.0 ÷ guidance 7, twice the steps": (
            {**common, "num_inference_steps": 2 * args.steps, "guidance_scale": 1.0},
            {**common, "num_inference_steps": 2 * args.steps, "guidance_scale": 7.0}),
        "4-step LCM (guidance 1.0) ÷ 30-step default": (
            {**common, "num_inference_steps": 4, "guidance_scale": 1.0, "scheduler": "LCM"},
            {**common, "num_inference_steps": 30}),
    }
    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    server = Server(args.model_dir, args, Path(tempfile.mkdtemp()), log_path)
    server.wait_ready()
    try:
        results = alternate(server, pairs, args.runs)
    finally:
        server.stop()
    # A denoising step's own cost, without what every request pays once (prompt encoding, VAE
    # decode, PNG, HTTP): the difference between twice the steps and the steps, per step.
    once, twice = results["guidance 1.0 ÷ guidance 7, same steps"], results["guidance 1.0 ÷ guidance 7, twice the steps"]
    per_step = {side: (twice[f"{side}_s"] - once[f"{side}_s"]) / args.steps for side in ("fast", "slow")}
    results["guidance 1.0 ÷ guidance 7, per denoising step"] = {
        "fast_s": round(per_step["fast"], 5), "slow_s": round(per_step["slow"], 5),
        "ratio": round(per_step["fast"] / per_step["slow"], 3)}
    print("per denoising step", results["guidance 1.0 ÷ guidance 7, per denoising step"]["ratio"], flush=True)
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{platform.machine()}"
    import diffusers

    report = {"device": device, "date": date, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "size": args.size, "runs": args.runs, "model": "tiny SDXL" if "sdserve-bench-model" in str(args.model_dir)
              else "<model_dir>", "results": results}
    stem = f"few-step-{'cuda' if args.device == 'cuda' else 'cpu-' + platform.machine()}-{date}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# sdserve few-step benchmark: {device} ({date})", "",
             f"torch {report['torch']}, diffusers {report['diffusers']}; {report['model']}, {args.size}x{args.size}, "
             f"median of {args.runs} requests each, sent in turn", "", "| measure | fast s | slow s | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {r['fast_s']} | {r['slow_s']} | {r['ratio']} |" for name, r in results.items()]
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
