"""What a progress preview costs against the denoising step it follows.

Times one guided UNet call (batch 2: the unconditional and the conditional row) of the tiny SDXL
model (``sdserve.tiny.write_tiny_model(dir, "sdxl")``, loaded with
``StableDiffusionXLPipeline.from_pretrained``) against one preview of the same image
(``sdserve.generation.preview.Previewer``): the default linear latent-to-RGB map, and the TAESD
path with a random-weight ``AutoencoderTiny`` of TAESD's real architecture (diffusers' default
config: what taesdxl costs, whatever its weights). Calls are measured in turn, run by run, and the
medians compared. With a CUDA device the same runs on it, and there also against a full-size
random-weight SDXL UNet (bench/model-configs, float16), the step a real request pays:

    python bench/preview.py                       # CPU, then CUDA when present; 1024x1024
    python bench/preview.py --device cpu --size 512 --runs 5

Results go to stdout only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from sdserve.generation.preview import Previewer  # noqa: E402  (src/ is on the path from here)


def unet_inputs(unet, size: int, vae_scale_factor: int, device, dtype, batch: int = 2, seed: int = 0):
    """Random inputs of the right shapes for one SDXL UNet call at ``size`` pixels."""
    config = unet.config
    g = torch.Generator("cpu").manual_seed(seed)
    side = size // vae_scale_factor
    text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return dict(
        sample=rand(batch, config.in_channels, side, side),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=rand(batch, 77, config.cross_attention_dim),
        added_cond_kwargs={
            "text_embeds": rand(batch, text_embeds),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype),
        },
    )


def alternate(calls: dict, runs: int, device: torch.device, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each call, the calls made in turn ``runs`` times after ``warmup`` rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + runs):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def tiny_vae_dir(root: Path, latent_channels: int = 4) -> str:
    from diffusers import AutoencoderTiny

    folder = root / f"taesd-{latent_channels}"
    torch.manual_seed(0)
    AutoencoderTiny(latent_channels=latent_channels).save_pretrained(folder)  # TAESD's real architecture
    return str(folder)


def report(title: str, medians: dict[str, float], step: str) -> None:
    print(f"\n{title}")
    base = medians[step]
    for name, seconds in medians.items():
        ratio = "" if name == step else f"  {100 * seconds / base:7.3f} % of {step}"
        print(f"  {name:32s} {1000 * seconds:10.3f} ms{ratio}")


@torch.inference_mode()
def run(device: torch.device, size: int, runs: int, scratch: Path, full_size: bool, with_taesd: bool = True) -> None:
    from diffusers import StableDiffusionXLPipeline

    from sdserve.tiny import write_tiny_model

    model_dir = scratch / "sdxl"
    if not model_dir.exists():
        write_tiny_model(model_dir, "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir).to(device)
    factor = pipe.vae_scale_factor
    inputs = unet_inputs(pipe.unet, size, factor, device, torch.float32)
    latents = inputs["sample"][:1]  # one image's latents, as the progress hook gets them
    linear = Previewer("sdxl", 4, vae_scale_factor=factor, device=device)
    previews = {"preview: linear map": linear}
    if with_taesd:
        previews["preview: TAESD (real arch.)"] = Previewer(
            "sdxl", 4, vae_scale_factor=factor, tiny_vae_dir=tiny_vae_dir(scratch), device=device,
            dtype=torch.float16 if device.type == "cuda" else torch.float32)
    assert all(previewer(latents).shape == (size, size, 3) for previewer in previews.values())
    calls = {"tiny SDXL UNet, batch 2": lambda unet=pipe.unet, inputs=inputs: unet(**inputs)}
    calls.update({name: (lambda p=previewer: p(latents)) for name, previewer in previews.items()})
    medians = alternate(calls, runs, device)
    report(f"{device.type} ({torch.get_num_threads()} threads), {size}x{size}, medians of {runs} runs:",
           medians, "tiny SDXL UNet, batch 2")

    if full_size and device.type == "cuda":
        from diffusers import UNet2DConditionModel
        from full_size import _config, _tame

        with torch.device(device):
            unet = _tame(UNet2DConditionModel.from_config(_config("sdxl-base-1.0", "unet"))).to(torch.float16)
        inputs = unet_inputs(unet, size, factor, device, torch.float16)
        latents = inputs["sample"][:1]
        calls = {"full-size SDXL UNet, batch 2": lambda: unet(**inputs)}
        calls.update({name: (lambda p=previewer: p(latents)) for name, previewer in previews.items()})
        medians = alternate(calls, runs, device)
        report(f"{device.type}, full-size SDXL UNet (float16, random weights), {size}x{size}, medians of {runs} runs:",
               medians, "full-size SDXL UNet, batch 2")
        del unet
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, then CUDA when present")
    parser.add_argument("--size", type=int, default=1024, help="image width and height in pixels")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--no_full_size", action="store_true", help="on CUDA, skip the full-size SDXL UNet")
    parser.add_argument("--no_taesd", action="store_true",
                        help="skip the TAESD preview (slow on a small CPU: seconds a call at 1024x1024)")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("error: --device cuda but no CUDA device is available")
        devices.remove("cuda")
    with tempfile.TemporaryDirectory() as scratch:
        for name in devices:
            device = torch.device(name)
            runs = args.runs or (5 if device.type == "cpu" else 20)
            run(device, args.size, runs, Path(scratch), full_size=not args.no_full_size, with_taesd=not args.no_taesd)


if __name__ == "__main__":
    main()
