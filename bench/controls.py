"""ControlNets in the step loop, measured in one run (tiny SDXL on a CPU by default):

* one denoiser step with a ControlNet (the ControlNet call, then the UNet with its residuals)
  against the plain UNet step, by rows;
* 8 concurrent requests, half with a ControlNet and half without, against 8 plain ones plus the
  ControlNet's own cost (its call on the 4 controlled images' rows, measured here): what mixed
  traffic would take if control cost nothing beyond that call.

Each comparison runs its sides in turn, so a machine whose speed drifts weighs on all alike:

    python bench/controls.py                             # tiny SDXL + a tiny ControlNet, 128x128, CPU
    python bench/controls.py --device cuda --model_dir DIR --control NAME --size 1024

Results: bench/results/controls-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdserve.generation import Engine, EngineSettings
from sdserve.request import Limits
from sdserve.server.model_setup import ModelSettings, prepare

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 8


def control_image(size: int) -> str:
    """A white ring on black, as an edge map looks: base64 PNG."""
    y, x = np.mgrid[0:size, 0:size] / size
    ring = np.abs(np.hypot(x - 0.5, y - 0.5) - 0.3) < 0.01
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(ring[..., None] * 255, 3, -1).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def start(args):
    served = {}

    def load():
        settings = ModelSettings(model_dir=str(args.model_dir), device=args.device, dtype=args.dtype)
        served["model"] = prepare("bench", settings, Limits())
        return served["model"].backend

    engine = Engine(EngineSettings(max_batch_images=IMAGES))
    engine.start(load).result()
    return engine, served["model"]


def steps_per_second(engine, model, controlled: int, args) -> float:
    """Denoising steps/s of 8 requests submitted together, the first ``controlled`` with the ControlNet."""
    values = {"prompt": "a lighthouse", "num_inference_steps": args.steps, "width": args.size, "height": args.size,
              "guidance_scale": 5.0}
    control = [{"model": args.control, "image": control_image(args.size)}]
    requests = [model.parser.parse({**values, "seed": i, **({"controls": control} if i < controlled else {})})
                for i in range(IMAGES)]
    started = time.perf_counter()
    jobs = engine.submit(requests, "bench")
    for job in jobs:
        job.future.result(600)
    return IMAGES * args.steps / (time.perf_counter() - started)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


@torch.inference_mode()
def step_costs(model, args) -> dict:
    """Median seconds of a plain UNet step, of the ControlNet call alone and of a step with it, by rows."""
    pipeline, device = model.loaded.base, torch.device(args.device)
    unet, controlnet = pipeline.unet, model.backend.controls.get(args.control)
    out = {}
    for rows in (2, 8, 16):
        latent = args.size // pipeline.vae_scale_factor
        x = torch.randn(rows, 4, latent, latent, device=device, dtype=unet.dtype)
        t = torch.full((rows,), 500.0, device=device)
        kwargs = {"encoder_hidden_states": torch.randn(rows, 77, unet.config.cross_attention_dim, device=device,
                                                       dtype=unet.dtype),
                  "added_cond_kwargs": {"text_embeds": torch.randn(rows, pipeline.text_encoder_2.config.projection_dim,
                                                                   device=device, dtype=unet.dtype),
                                        "time_ids": torch.randn(rows, 6, device=device, dtype=unet.dtype)}}
        cond = torch.rand(rows, 3, args.size, args.size, device=device, dtype=unet.dtype)

        def controlled():
            down, mid = controlnet(x, t, controlnet_cond=cond, return_dict=False, **kwargs)
            unet(x, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs)

        ways = {"plain UNet step": lambda: unet(x, t, **kwargs),
                "ControlNet call": lambda: controlnet(x, t, controlnet_cond=cond, return_dict=False, **kwargs),
                "step with the ControlNet": controlled}
        times: dict[str, list[float]] = {way: [] for way in ways}
        for i in range(args.calls + 2):
            for way, fn in ways.items():
                seconds = _timed(fn, device)
                if i >= 2:
                    times[way].append(seconds)
        plain = statistics.median(times["plain UNet step"])
        out[rows] = {way: {"s": round(statistics.median(v), 5),
                           "ratio_to_plain": round(statistics.median(v) / plain, 3)} for way, v in times.items()}
        print(rows, {way: r["ratio_to_plain"] for way, r in out[rows].items()}, flush=True)
    return out


def throughput(engine, model, args, costs: dict) -> dict:
    samples: dict[str, list[float]] = {"8 plain": [], "4 with a ControlNet + 4 plain": []}
    for run in range(args.runs + 1):  # the first round warms up
        for key, controlled in (("8 plain", 0), ("4 with a ControlNet + 4 plain", IMAGES // 2)):
            rate = steps_per_second(engine, model, controlled, args)
            if run:
                samples[key].append(rate)
    plain, mixed = (statistics.median(v) for v in samples.values())
    # The ControlNet's own cost per step: its call on the 4 controlled images' 8 rows (guidance 5).
    control_s = costs[IMAGES]["ControlNet call"]["s"]
    ideal = IMAGES / (IMAGES / plain + control_s)
    return {"plain_steps_per_s": round(plain, 2), "mixed_steps_per_s": round(mixed, 2),
            "controlnet_s_per_step": control_s, "plain_plus_controlnet_steps_per_s": round(ideal, 2),
            "mixed_ratio_to_plain_plus_controlnet": round(mixed / ideal, 3), "target": 0.85, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model_dir", type=Path, help="default: a tiny SDXL with a tiny ControlNet")
    parser.add_argument("--control", default="edges", help="a ControlNet under <model_dir>/controls")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="rounds of the 8-request comparison")
    parser.add_argument("--calls", type=int, default=20, help="calls per way and row count")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    tiny = args.model_dir is None
    if tiny:
        from sdserve.tiny import write_tiny_model

        args.model_dir = write_tiny_model(Path(tempfile.mkdtemp(prefix="sdserve-bench-model-")), "sdxl")
        write_tiny_model(args.model_dir / "controls" / args.control, "sdxl-controlnet", seed=1)
    torch.manual_seed(0)
    engine, model = start(args)
    try:
        steps_per_second(engine, model, 1, args)  # loads the ControlNet
        costs = step_costs(model, args)
        report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{platform.machine()}",
                  "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                  "model": "tiny SDXL, tiny ControlNet" if tiny else "<model_dir>", "size": args.size,
                  "steps": args.steps, "runs": args.runs, "concurrent_requests": throughput(engine, model, args, costs),
                  "step_by_rows": costs}
    finally:
        engine.stop(timeout=30)
    stem = f"controls-{'cuda' if args.device == 'cuda' else 'cpu-' + platform.machine()}-{report['date']}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    c = report["concurrent_requests"]
    lines = [f"# sdserve ControlNets: {report['device']} ({report['date']})", "",
             f"torch {report['torch']}; {report['model']}; {args.size}x{args.size}, {args.steps} steps, guidance 5",
             "", "| 8 concurrent requests | steps/s |", "|---|---|",
             f"| 8 plain | {c['plain_steps_per_s']} |",
             f"| 8 plain + the ControlNet's own cost ({c['controlnet_s_per_step'] * 1000:.1f} ms a step) | "
             f"{c['plain_plus_controlnet_steps_per_s']} |",
             f"| 4 with a ControlNet + 4 plain | {c['mixed_steps_per_s']} |",
             f"| ratio (target ≥ {c['target']}) | **{c['mixed_ratio_to_plain_plus_controlnet']}** |"]
    ways = list(next(iter(costs.values())))
    lines += ["", "| rows | " + " | ".join(f"{w} (÷ plain)" for w in ways) + " |", "|---" * (len(ways) + 1) + "|"]
    for rows, r in costs.items():
        lines.append(f"| {rows} | " + " | ".join(f"{r[w]['s'] * 1000:.1f} ms ({r[w]['ratio_to_plain']})" for w in ways)
                     + " |")
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
