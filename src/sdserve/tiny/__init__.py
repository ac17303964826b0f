"""Tiny random-weight pipelines built from the real diffusers/transformers classes.

They load through the same code as real models (``save_pretrained`` then the model store), run
in milliseconds on a CPU, and back the tests and the demo server. Images are noise-like: the
weights are random, only the machinery is real.

    sdserve tiny-model DIR --kind sdxl-refiner   # DIR/base + DIR/refiner
    sdserve tiny-model DIR --kind sdxl           # DIR is one diffusers folder
    sdserve tiny-model DIR --kind sd             # an SD 2.x-style folder
    sdserve tiny-model DIR --kind sd3            # StableDiffusion3Pipeline with a tiny T5
    sdserve tiny-model DIR --kind sd35           # the same with SD3.5's options (dual attention, qk norm)
    sdserve tiny-model DIR --kind flux           # FluxPipeline with FLUX.1 [dev]'s embedded guidance
    sdserve tiny-model DIR --kind flux-schnell   # FluxPipeline without guidance, as FLUX.1 [schnell]
    sdserve tiny-model DIR --kind flux-fill      # FluxFillPipeline: inpainting as FLUX.1 Fill [dev]
    sdserve tiny-model DIR --kind sd-single-file # DIR/model.safetensors (original layout) + DIR/config/
    sdserve tiny-model DIR --kind sdxl-controlnet   # a ControlNetModel for the tiny SDXL (also sd-controlnet)
    sdserve tiny-model DIR --kind sdxl-t2i-adapter  # a T2IAdapter for the tiny SDXL (also sd-t2i-adapter)
    sdserve tiny-model DIR --kind sdxl-ip-adapter   # an IP-Adapter for the tiny SDXL (also sd-ip-adapter)
    sdserve tiny-model DIR --loras trex,pixel    # also DIR/loras/<name>/pytorch_lora_weights.safetensors
"""

from __future__ import annotations

from pathlib import Path

import torch

from .controls import CONTROL_KINDS, write_control
from .denoisers import tiny_unet, tiny_vae
from .mmdit import build_flux, build_sd3
from .original_layout import write_single_file
from .text_config import text_config as _text_config
from .tokenizers import clip_tokenizer, save_pipeline, write_clip_tokenizer_files

__all__ = ["KINDS", "build_flux", "build_sd", "build_sd3", "build_sdxl", "clip_tokenizer", "save_pipeline",
           "write_clip_tokenizer_files", "write_lora", "write_single_file", "write_tiny_model", "ATTENTION"]

KINDS = ("sdxl", "sdxl-refiner", "sd", "sd3", "sd35", "flux", "flux-schnell", "flux-fill", "sd-single-file",
         "sd-inpaint", "sdxl-inpaint", "refiner-only", *CONTROL_KINDS)

_SCHEDULER = {  # SDXL base 1.0's own scheduler settings
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "num_train_timesteps": 1000,
}


def build_sdxl(scratch: Path, with_refiner: bool = False, seed: int = 0, inpaint: bool = False):
    """(base, refiner or None): a tiny SDXL base and optionally its refiner sharing text_encoder_2/vae;
    ``inpaint`` makes the base a StableDiffusionXLInpaintPipeline with a 9-channel UNet."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(scratch / "tok1", "<|endoftext|>")
    tokenizer_2 = clip_tokenizer(scratch / "tok2", "!")
    base = (StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline)(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, projection=False)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, projection=True)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_unet(cross_attention_dim=64, time_ids=6, in_channels=9 if inpaint else 4),
        scheduler=EulerDiscreteScheduler(**_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )
    refiner = None
    if with_refiner:
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=base.vae,
            text_encoder=None,
            text_encoder_2=base.text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer_2,
            # the refiner conditions on text_encoder_2 only, and on an aesthetic score (5 time ids)
            unet=tiny_unet(cross_attention_dim=32, time_ids=5),
            scheduler=EulerDiscreteScheduler(**_SCHEDULER),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    return base, refiner


def build_sd(scratch: Path, seed: int = 0, inpaint: bool = False):
    """A tiny SD 2.x-style StableDiffusionPipeline (one text encoder, no added conditioning), or
    with ``inpaint`` a StableDiffusionInpaintPipeline with a 9-channel UNet."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(scratch / "tok", "<|endoftext|>")
    return (StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, projection=False)),
        tokenizer=tokenizer,
        unet=tiny_unet(cross_attention_dim=32, time_ids=None, in_channels=9 if inpaint else 4),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # what diffusers' DreamBooth LoRA scripts target
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_lora(pipeline, dest: Path, seed: int, targets: tuple[str, ...] = ATTENTION, rank: int = 4,
               dora: bool = False, text_encoders: bool = False) -> Path:
    """A small random LoRA, made with peft and saved in the diffusers LoRA format
    (``pytorch_lora_weights.safetensors``), as diffusers' DreamBooth LoRA training scripts save it:
    on the denoiser's ``targets`` (attention projections; convolutions such as ``conv1`` make a
    LoCon), optionally DoRA, and optionally on the text encoders' attention too."""
    from copy import deepcopy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    denoiser_name = "transformer" if hasattr(pipeline, "transformer") else "unet"
    parts = [(denoiser_name, getattr(pipeline, denoiser_name), targets)]
    if text_encoders:
        parts += [(name, getattr(pipeline, name), TEXT_ATTENTION) for name in ("text_encoder", "text_encoder_2")
                  if getattr(pipeline, name, None) is not None]
    layers = {}
    for name, model, modules in parts:
        # init_lora_weights=False: random, non-zero LoRA so that it visibly changes images. Added to a
        # copy, so the pipeline keeps no trace of it.
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, use_dora=dora, target_modules=list(modules))
        copy = inject_adapter_in_model(config, deepcopy(model), adapter_name="tiny")
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(copy, adapter_name="tiny"))
    type(pipeline).save_lora_weights(dest, safe_serialization=True, **layers)
    return dest


def write_tiny_model(dest: str | Path, kind: str = "sdxl-refiner", seed: int = 0, loras: tuple[str, ...] = ()) -> Path:
    """Build a tiny model of ``kind`` and save it under ``dest`` in a layout sdserve serves;
    each name in ``loras`` adds ``dest/loras/<name>/``."""
    import tempfile

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    dest = Path(dest)
    if kind in CONTROL_KINDS:
        if loras:
            raise ValueError("LoRA adapters are for a base model; a control model takes none")
        return write_control(dest, kind, seed)
    with tempfile.TemporaryDirectory() as scratch:
        if kind == "sd-inpaint":
            base = build_sd(Path(scratch), seed, inpaint=True)
            save_pipeline(base, dest)
        elif kind == "sdxl-inpaint":
            base, _ = build_sdxl(Path(scratch), seed=seed, inpaint=True)
            save_pipeline(base, dest)
        elif kind == "refiner-only":  # an SDXL refiner alone: an image-to-image model
            if loras:
                raise ValueError("LoRA adapters are for a base model; the refiner-only kind takes none")
            _, refiner = build_sdxl(Path(scratch), with_refiner=True, seed=seed)
            save_pipeline(refiner, dest)
        elif kind in ("sd", "sd-single-file"):
            base = build_sd(Path(scratch), seed)
            write_single_file(base, dest) if kind == "sd-single-file" else save_pipeline(base, dest)
        elif kind in ("sd3", "sd35"):
            base = build_sd3(Path(scratch), seed, sd35=kind == "sd35")
            save_pipeline(base, dest)
        elif kind in ("flux", "flux-schnell", "flux-fill"):
            base = build_flux(Path(scratch), seed, guidance=kind != "flux-schnell", fill=kind == "flux-fill")
            save_pipeline(base, dest)
        elif kind == "sdxl":
            base, _ = build_sdxl(Path(scratch), seed=seed)
            save_pipeline(base, dest)
        else:
            base, refiner = build_sdxl(Path(scratch), with_refiner=True, seed=seed)
            save_pipeline(base, dest / "base")
            save_pipeline(refiner, dest / "refiner")
        for i, name in enumerate(loras):
            write_lora(base, dest / "loras" / name, seed=seed + 1 + i)
    return dest
