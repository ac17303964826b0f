"""Full-size random-weight SDXL base (+ refiner) from the architecture configs in
bench/model-configs (copies of SDXL 1.0's): the real compute and memory cost, no download.

    python bench/full_size.py /tmp/sdxl-random --device cuda     # writes base/ and refiner/

Weights are drawn N(0, 0.02) (biases 0) so activations stay finite through 30 steps in float16;
images are noise. Tokenizers are sdserve's small CLIP BPE (token ids fit the real vocabulary).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "model-configs"


def _config(name: str, component: str) -> dict:
    return json.loads((CONFIGS / name / component / "config.json").read_text())


def _tame(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model


def build(device: str = "cuda", dtype: torch.dtype = torch.float16, with_refiner: bool = True):
    """(base, refiner or None) pipelines with random weights, on ``device``."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdserve.tiny import clip_tokenizer

    scratch = Path(tempfile.mkdtemp())
    base_name = "sdxl-base-1.0"
    with torch.device(device):  # weights are created (and initialised) where they will live
        te = _tame(CLIPTextModel(CLIPTextConfig.from_dict(_config(base_name, "text_encoder")))).to(dtype)
        te2 = _tame(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(_config(base_name, "text_encoder_2")))).to(dtype)
        vae = _tame(AutoencoderKL.from_config(_config(base_name, "vae"))).to(dtype)
        unet = _tame(UNet2DConditionModel.from_config(_config(base_name, "unet"))).to(dtype)
        refiner_unet = _tame(UNet2DConditionModel.from_config(_config("sdxl-refiner-1.0", "unet"))).to(dtype) if with_refiner else None
    scheduler_config = json.loads((CONFIGS / base_name / "scheduler" / "scheduler_config.json").read_text())
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2,
        tokenizer=clip_tokenizer(scratch / "tok1", "<|endoftext|>"), tokenizer_2=clip_tokenizer(scratch / "tok2", "!"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
    )
    refiner = None
    if with_refiner:
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=base.tokenizer_2,
            unet=refiner_unet, scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )
    return base, refiner


def write(dest: Path, device: str = "cuda", with_refiner: bool = True) -> Path:
    """Build and save as ``dest/base`` (+ ``dest/refiner``) in float16."""
    from sdserve.tiny import save_pipeline

    base, refiner = build(device, torch.float16, with_refiner)
    save_pipeline(base, dest / "base")
    if refiner is not None:
        save_pipeline(refiner, dest / "refiner")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no_refiner", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    write(args.dest, args.device, not args.no_refiner)
    print(f"wrote {args.dest} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
