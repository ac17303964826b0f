"""FLUX.1 through sdserve, in one run:

* one request over HTTP ÷ the same call of bare ``FluxPipeline`` (its own process's pipeline from the
  same folder, same size, steps, guidance and seed), the two sent in turn; and ÷ that call plus the
  PNG encoding any server does before it answers (sdserve's own encoder, without the metadata);
* 8 concurrent requests of different steps, guidance and seeds ÷ 8 identical ones: denoising steps
  per second (the mixed ones share the transformer's calls as the identical ones do).

    python bench/flux.py                                              # tiny FLUX.1 [dev], CPU
    python bench/full_size_flux.py /tmp/flux-random --device cuda      # full-size [schnell], ~34 GB
    python bench/flux.py --device cuda --dtype bfloat16 --model_dir /tmp/flux-random --size 1024 --steps 4

Results: bench/results/flux-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from baseline import PROMPT, sync  # noqa: E402  (bench/ is on the path from here)
from few_step import server_bench_arguments  # noqa: E402

from server import Server  # noqa: E402

from sdserve.generation.decode import to_uint8  # noqa: E402
from sdserve.protocol.image_encoding import encode_image  # noqa: E402

CONCURRENT = 8


def bare_pipeline(args):
    """FluxPipeline from the folder, as a diffusers user loads it (bfloat16 on CUDA)."""
    from diffusers import FluxPipeline

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(args.model_dir, torch_dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def against_bare(server: Server, pipe, request: dict, runs: int, device: torch.device) -> dict:
    """Median seconds of the HTTP request and of the pipeline call, sent in turn."""
    call = {"prompt": PROMPT, "width": request["width"], "height": request["height"],
            "num_inference_steps": request["num_inference_steps"]}
    if "guidance_scale" in request:
        call["guidance_scale"] = request["guidance_scale"]

    def bare() -> tuple[float, float]:
        """Seconds of the call, and of the call and the PNG encoding of its image."""
        sync(device)
        began = time.perf_counter()
        images = pipe(**call, generator=torch.Generator("cpu").manual_seed(request["seed"]), output_type="np").images
        sync(device)
        called = time.perf_counter()
        encode_image(to_uint8(images)[0])
        return called - began, time.perf_counter() - began

    server.predict(**request), bare()  # warm-up: first calls of a shape are slower
    http_s, bare_s, encoded_s = [], [], []
    for _ in range(runs):
        http_s.append(server.predict(**request))
        call_s, with_png_s = bare()
        bare_s.append(call_s)
        encoded_s.append(with_png_s)
    http_m, bare_m, encoded_m = (statistics.median(x) for x in (http_s, bare_s, encoded_s))
    return {"http_s": round(http_m, 4), "bare_s": round(bare_m, 4), "ratio": round(http_m / bare_m, 3),
            "bare_png_s": round(encoded_m, 4), "ratio_to_bare_png": round(http_m / encoded_m, 3),
            "http_samples": http_s, "bare_samples": bare_s, "bare_png_samples": encoded_s}


def steps_per_second(server: Server, requests: list[dict]) -> float:
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        list(pool.map(lambda r: server.predict(**r), requests))
    return sum(r["num_inference_steps"] for r in requests) / (time.perf_counter() - began)


def mixed_against_identical(server: Server, common: dict, guidance: bool, runs: int) -> dict:
    """8 requests of different steps (and guidance) against 8 identical ones, rounds in turn."""
    steps = common["num_inference_steps"]
    identical = [{**common, "seed": i} for i in range(CONCURRENT)]
    mixed = [{**common, "seed": i, "num_inference_steps": max(1, steps - 2 + i % 5),
              **({"guidance_scale": 2.0 + i / 2} if guidance else {})} for i in range(CONCURRENT)]
    steps_per_second(server, identical), steps_per_second(server, mixed)  # warm-up
    samples: dict[str, list[float]] = {"identical": [], "mixed": []}
    for _ in range(runs):
        samples["identical"].append(steps_per_second(server, identical))
        samples["mixed"].append(steps_per_second(server, mixed))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {"identical_steps_per_s": round(medians["identical"], 2), "mixed_steps_per_s": round(medians["mixed"], 2),
            "ratio": round(medians["mixed"] / medians["identical"], 3), "samples": samples,
            "mixed_steps": [r["num_inference_steps"] for r in mixed]}


def main() -> None:
    args = server_bench_arguments(__doc__.split("\n\n")[0], 20)
    args.max_batch_images = CONCURRENT
    tiny = args.model_dir is None
    if tiny:
        from sdserve.tiny import write_tiny_model

        args.model_dir = write_tiny_model(Path(tempfile.mkdtemp(prefix="sdserve-bench-flux-")), "flux")
    pipe = bare_pipeline(args)
    guidance = bool(pipe.transformer.config.guidance_embeds)  # [schnell] takes none
    common = {"width": args.size, "height": args.size, "num_inference_steps": args.steps, "seed": 1,
              **({"guidance_scale": 3.5} if guidance else {})}
    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    server = Server(args.model_dir, args, Path(tempfile.mkdtemp()), log_path)
    load_s = server.wait_ready()
    try:
        results = {"HTTP request ÷ bare FluxPipeline call": against_bare(server, pipe, common, args.runs,
                                                                           torch.device(args.device)),
                   "8 mixed ÷ 8 identical, steps/s": mixed_against_identical(server, common, guidance, args.runs)}
    finally:
        server.stop()
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{platform.machine()}"
    import diffusers

    report = {"device": device, "date": date, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "model": "tiny FLUX.1 [dev]" if tiny else f"<model_dir> ({'dev' if guidance else 'schnell'})",
              "size": args.size, "steps": args.steps, "runs": args.runs, "server_ready_s": round(load_s, 1),
              "results": results}
    if args.device == "cuda":
        report["bare_pipeline_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    stem = f"flux-{'cuda' if args.device == 'cuda' else 'cpu-' + platform.machine()}-{date}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    bare, mixed = results.values()
    lines = [f"# sdserve FLUX.1 benchmark: {device} ({date})", "",
             f"torch {report['torch']}, diffusers {report['diffusers']}; {report['model']}, {args.size}x{args.size}, "
             f"{args.steps} steps, medians of {args.runs} rounds, the two sides in turn", "",
             "| measure | sdserve | other side | ratio | target |", "|---|---|---|---|---|",
             f"| HTTP request ÷ bare FluxPipeline call, s | {bare['http_s']} | {bare['bare_s']} | {bare['ratio']} "
             "| ≤ 1.10 |",
             f"| HTTP request ÷ bare call + PNG encoding, s | {bare['http_s']} | {bare['bare_png_s']} | "
             f"{bare['ratio_to_bare_png']} | |",
             f"| 8 mixed ÷ 8 identical requests, steps/s | {mixed['mixed_steps_per_s']} | "
             f"{mixed['identical_steps_per_s']} | {mixed['ratio']} | ≥ 0.9 |",
             "", f"mixed requests' steps: {mixed['mixed_steps']}"]
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
