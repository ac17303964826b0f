"""Fewer denoiser FLOPs per image, over HTTP against a real server, in one run:

* ``guidance_interval`` [0.2, 0.8] against guidance at every step (same request otherwise), end to
  end and per denoising step;
* ``cache: deep`` (DeepCache, interval 3) against the plain request, end to end and per denoising
  step (the denoiser's share: from the same pair at twice the steps, what every request pays once
  cancels).

Each pair runs in alternation, request by request (``few_step.alternate``); medians' ratios:

    python bench/step_savings.py --device cpu                       # tiny SDXL, 256x256
    python bench/full_size.py /tmp/sdxl-random --device cuda --no_refiner
    python bench/step_savings.py --device cuda --model_dir /tmp/sdxl-random --dtype float16

Results: bench/results/step-savings-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from few_step import alternate, server_bench_arguments  # noqa: E402  (bench/ is on the path from here)

from server import Server  # noqa: E402

INTERVAL = {"guidance_interval": [0.2, 0.8]}
DEEP = {"cache": "deep", "cache_interval": 3}


def per_step(results: dict, name: str, steps: int) -> dict:
    """A denoising step's own cost: the difference between twice the steps and the steps, per step."""
    once, twice = results[f"{name}, end to end"], results[f"{name}, twice the steps"]
    fast, slow = ((twice[f"{side}_s"] - once[f"{side}_s"]) / steps for side in ("fast", "slow"))
    return {"fast_s": round(fast, 5), "slow_s": round(slow, 5), "ratio": round(fast / slow, 3)}


def main() -> None:
    args = server_bench_arguments(__doc__.split("\n\n")[0], 30)
    tiny = args.model_dir is None
    if tiny:
        from sdserve.tiny import write_tiny_model

        args.model_dir = write_tiny_model(Path(tempfile.mkdtemp(prefix="sdserve-bench-model-")), "sdxl")
    common = {"width": args.size, "height": args.size, "refiner": "none", "seed": 1, "guidance_scale": 7.0}
    pairs = {}
    for name, saving in (("guidance_interval [0.2, 0.8] ÷ every step guided", INTERVAL),
                         ("cache deep, interval 3 ÷ plain", DEEP)):
        for label, steps in (("end to end", args.steps), ("twice the steps", 2 * args.steps)):
            plain = {**common, "num_inference_steps": steps}
            pairs[f"{name}, {label}"] = ({**plain, **saving}, plain)
    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    server = Server(args.model_dir, args, Path(tempfile.mkdtemp()), log_path)
    server.wait_ready()
    try:
        results = alternate(server, pairs, args.runs)
        saved = {name: server.predict_timed(**fast)[1].get("rows_saved") for name, (fast, _) in pairs.items()
                 if name.endswith("end to end")}
    finally:
        server.stop()
    for name in ("guidance_interval [0.2, 0.8] ÷ every step guided", "cache deep, interval 3 ÷ plain"):
        results[f"{name}, per denoising step"] = per_step(results, name, args.steps)
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{platform.machine()}"
    import diffusers

    report = {"device": device, "date": date, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "size": args.size, "steps": args.steps, "runs": args.runs, "rows_saved": saved,
              "model": "tiny SDXL" if tiny else "<model_dir>", "results": results}
    stem = f"step-savings-{'cuda' if args.device == 'cuda' else 'cpu-' + platform.machine()}-{date}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# sdserve fewer denoiser FLOPs: {device} ({date})", "",
             f"torch {report['torch']}, diffusers {report['diffusers']}; {report['model']}, {args.size}x{args.size}, "
             f"{args.steps} steps, guidance 7, median of {args.runs} requests each, sent in turn", "",
             "| measure | with the saving, s | without, s | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['fast_s']} | {r['slow_s']} | {r['ratio']} |" for name, r in results.items()]
    lines += ["", f"rows saved per request: {json.dumps(saved)}"]
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
