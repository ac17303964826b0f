"""Different LoRA adapters in one denoiser call, measured in one run (tiny SDXL on a CPU by default):

* 8 concurrent requests, each with its own adapter, against 8 that share one adapter (denoising
  steps/s), and against the same 8 different adapters in calls of one adapter set each, as the
  step policy ran them before adapters could share a call;
* one denoiser call as its rows grow (1-16): without adapters, with one adapter on every row, with
  a different adapter on each row (sdserve's per-row deltas), and with peft's own mixed-batch path
  (``adapter_names``, one adapter per row at its global scale) for comparison.

Each comparison runs its sides in turn, so a machine whose speed drifts weighs on all alike:

    python bench/mixed_adapters.py                      # tiny SDXL, 128x128, CPU
    python bench/mixed_adapters.py --device cuda --model_dir DIR --loras a,b,c,d,e,f,g,h

Results: bench/results/mixed-adapters-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdserve.generation import Engine, EngineSettings
from sdserve.request import Limits
from sdserve.server.model_setup import ModelSettings, prepare

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = 8


def start(args, one_call_per_set: bool):
    """An engine on the server's own model set-up; ``one_call_per_set``: every adapter set gets
    calls of its own (through peft), the policy before per-row adapters."""
    served = {}

    def load():
        settings = ModelSettings(model_dir=str(args.model_dir), device=args.device, dtype=args.dtype,
                                 max_loaded_adapters=None)
        served["model"] = prepare("bench", settings, Limits())
        if one_call_per_set:
            served["model"].adapters.resident.exclusive = lambda adapters: bool(adapters)
        return served["model"].backend

    engine = Engine(EngineSettings(max_batch_images=ADAPTERS))
    engine.start(load).result()
    return engine, served["model"]


def steps_per_second(engine, model, loras: list[str], args) -> float:
    """Denoising steps/s of len(loras) requests submitted together, request i with adapter loras[i]."""
    values = {"prompt": "a lighthouse", "num_inference_steps": args.steps, "width": args.size, "height": args.size,
              "guidance_scale": 5.0}
    requests = [model.parser.parse({**values, "seed": i, "loras": [name]}) for i, name in enumerate(loras)]
    started = time.perf_counter()
    jobs = engine.submit(requests, "bench")
    for job in jobs:
        job.future.result(600)
    return len(requests) * args.steps / (time.perf_counter() - started)


def throughput(args) -> dict:
    names = args.loras[:ADAPTERS]
    sides = {"8 adapters, one call": (False, names), "1 adapter shared": (False, [names[0]] * ADAPTERS),
             "8 adapters, a call per adapter (before)": (True, names)}
    engines = {key: start(args, one_call_per_set) for key, (one_call_per_set, _) in sides.items()}
    samples: dict[str, list[float]] = {key: [] for key in sides}
    try:
        for run in range(args.runs + 1):  # the first round warms up
            for key, (_, loras) in sides.items():
                rate = steps_per_second(*engines[key], loras, args)
                if run:
                    samples[key].append(rate)
    finally:
        for engine, _ in engines.values():
            engine.stop(timeout=30)
    medians = {key: statistics.median(v) for key, v in samples.items()}
    shared = medians["1 adapter shared"]
    return {key: {"steps_per_s": round(m, 2), "ratio_to_shared": round(m / shared, 3), "samples": samples[key]}
            for key, m in medians.items()}


@contextlib.contextmanager
def peft_mixed_batch(denoiser, names: list[str]):
    """peft's mixed-batch inference on a diffusers denoiser: every LoRA layer gets ``adapter_names``
    (what PeftModel's forward hooks pass), its adapters on."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "adapter_names": names}),
                                               with_kwargs=True) for layer in layers]
    for layer in layers:
        layer.enable_adapters(True)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.enable_adapters(False)


@torch.inference_mode()
def call_cost(args) -> dict:
    """Median seconds of one denoiser call by rows, each way of applying adapters in turn."""
    engine, model = start(args, one_call_per_set=False)
    try:
        pipeline, batched = model.loaded.base, model.adapters.resident.batched
        unet, device = pipeline.unet, torch.device(args.device)
        out = {}
        for rows in (1, 2, 4, 8, 16):
            latent = args.size // pipeline.vae_scale_factor
            x = torch.randn(rows, 4, latent, latent, device=device, dtype=unet.dtype)
            t = torch.full((rows,), 500.0, device=device)
            text = torch.randn(rows, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
            added = {"text_embeds": torch.randn(rows, pipeline.text_encoder_2.config.projection_dim, device=device,
                                                dtype=unet.dtype),
                     "time_ids": torch.randn(rows, 6, device=device, dtype=unet.dtype)}
            mixed = [args.loras[i % ADAPTERS] for i in range(rows)]
            ways = {
                "plain": contextlib.nullcontext,
                "one adapter": lambda: batched.rows([((args.loras[0], 1.0),)] * rows, device),
                "a different adapter per row": lambda: batched.rows([((n, 1.0),) for n in mixed], device),
                "peft adapter_names, a different adapter per row": lambda: peft_mixed_batch(unet, mixed),
            }
            times: dict[str, list[float]] = {way: [] for way in ways}
            for i in range(args.calls + 2):
                for way, scope in ways.items():
                    with scope():
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        began = time.perf_counter()
                        unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        if i >= 2:
                            times[way].append(time.perf_counter() - began)
            plain = statistics.median(times["plain"])
            out[rows] = {way: {"s": round(statistics.median(v), 5), "ratio_to_plain": round(statistics.median(v) / plain, 3)}
                         for way, v in times.items()}
            print(rows, {way: r["ratio_to_plain"] for way, r in out[rows].items()}, flush=True)
        return out
    finally:
        engine.stop(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model_dir", type=Path, help="default: a tiny SDXL with 8 tiny adapters")
    parser.add_argument("--loras", default=",".join(f"style{i}" for i in range(ADAPTERS)),
                        help=f"{ADAPTERS} adapter names under <model_dir>/loras")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="rounds of the 8-request comparison")
    parser.add_argument("--calls", type=int, default=20, help="denoiser calls per way and row count")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.loras = args.loras.split(",")
    tiny = args.model_dir is None
    if tiny:
        from sdserve.tiny import write_tiny_model

        args.model_dir = write_tiny_model(Path(tempfile.mkdtemp(prefix="sdserve-bench-model-")), "sdxl",
                                          loras=tuple(args.loras))
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{platform.machine()}",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "model": "tiny SDXL, 8 tiny attention LoRAs (rank 4)" if tiny else "<model_dir>",
              "size": args.size, "steps": args.steps, "runs": args.runs,
              "concurrent_requests": throughput(args), "denoiser_call_by_rows": call_cost(args)}
    stem = f"mixed-adapters-{'cuda' if args.device == 'cuda' else 'cpu-' + platform.machine()}-{report['date']}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# sdserve mixed adapters: {report['device']} ({report['date']})", "",
             f"torch {report['torch']}; {report['model']}; {args.size}x{args.size}, {args.steps} steps, guidance 5",
             "", "| 8 concurrent requests | steps/s | ÷ one shared adapter |", "|---|---|---|"]
    lines += [f"| {k} | {v['steps_per_s']} | {v['ratio_to_shared']} |" for k, v in report["concurrent_requests"].items()]
    ways = list(next(iter(report["denoiser_call_by_rows"].values())))
    lines += ["", "| rows | " + " | ".join(f"{w} (÷ plain)" for w in ways) + " |", "|---" * (len(ways) + 1) + "|"]
    for rows, r in report["denoiser_call_by_rows"].items():
        lines.append(f"| {rows} | " + " | ".join(f"{r[w]['s'] * 1000:.1f} ms ({r[w]['ratio_to_plain']})" for w in ways) + " |")
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
