"""The names a request may use: every field with a short description, the aliases other APIs use
for them, and the check of a request's names. What each field's values may be is declared once,
in ``parameters.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from kserve.errors import InvalidInput

# Every accepted field, with a short description (the JSON Schema's descriptions; bounds are added there).
FIELDS: dict[str, str] = {
    "prompt": "text to generate from (required)",
    "negative_prompt": "what to keep out of the image",
    "prompt_2": "SDXL/SD3/FLUX: prompt for the second text encoder (FLUX: T5; default: prompt)",
    "negative_prompt_2": "SDXL/SD3/FLUX: negative prompt for the second text encoder",
    "prompt_3": "SD3: prompt for the T5 encoder (default: prompt)",
    "negative_prompt_3": "SD3: negative prompt for the T5 encoder",
    "skip_guidance_layers": "SD3/SD3.5: skip-layer guidance (diffusers' SLG): the text row again without these "
                            "transformer layers, e.g. [7, 8, 9] for SD3.5 Medium; text-to-image with guidance",
    "skip_layer_guidance_scale": "SD3/SD3.5: the scale of skip-layer guidance (default 2.8)",
    "skip_layer_guidance_start": "SD3/SD3.5: skip-layer guidance from this fraction of the steps (default 0.01)",
    "skip_layer_guidance_stop": "SD3/SD3.5: skip-layer guidance until this fraction of the steps (default 0.2)",
    "prompt_syntax": "how prompts are read: plain (as diffusers reads them, 77 tokens), compel (weights like "
                     "(red hat)1.3, long prompts) or a1111 (AUTOMATIC1111's: (red hat:1.3), [blurry], BREAK); "
                     "absent: the server's --prompt_syntax",
    "width": "image width in pixels (default: the start image's, else the model's)",
    "height": "image height in pixels (default: the start image's, else the model's)",
    "num_inference_steps": "denoising steps",
    "guidance_scale": "classifier-free guidance scale (FLUX.1 [dev]: the guidance it embeds)",
    "true_cfg_scale": "FLUX: classifier-free guidance with negative_prompt (diffusers' true CFG; two rows per step) "
                      "when above 1; guidance_scale is FLUX.1 [dev]'s embedded guidance",
    "seed": "random seed (-1 or absent: random); image i uses seed + i",
    "num_images": "images to generate for this prompt",
    "scheduler": "sampler: any case, '_'/'-' for spaces, or a diffusers class name (absent: the model's own)",
    "eta": "DDIM/TCD: share of fresh noise in each step, 0 (deterministic) to 1 (default: 0.3 for TCD, else 0)",
    "timestep_spacing": "how the steps spread over the training timesteps, overriding the model's "
                        "(SDXL-Lightning: Euler + trailing; Hyper-SD: DDIM + trailing)",
    "timesteps": "the schedule outright: training timesteps, strictly descending (DMD2: [999, 749, 499, 249]); "
                 "num_inference_steps is its length; text-to-image on the base model only",
    "refiner": ("none | ensemble | refine; true: the default (ensemble with a refiner, none with a mask or "
                "timesteps); false: none"),
    "high_noise_frac": "ensemble split: fraction of denoising done by the base model",
    "refiner_strength": "refine mode: how much of the schedule the refiner re-runs",
    "original_size": "SDXL micro-conditioning [width, height]",
    "crops_coords_top_left": "SDXL micro-conditioning [top, left]",
    "target_size": "SDXL micro-conditioning [width, height]",
    "format": "output image format (any case)",
    "quality": "jpeg/webp quality",
    "guidance_interval": "[lo, hi]: classifier-free guidance only between these fractions of the schedule, one "
                         "denoiser row instead of two outside ([0, f]: diffusers' dynamic CFG); absent: the server's",
    "cache": "reuse deep features between steps: none, deep (UNet models: DeepCache) or first_block (SD3, "
             "FLUX.1: First Block Cache); absent: the server's --cache",
    "cache_interval": "cache deep: the deep blocks run every this many steps",
    "cache_threshold": "cache first_block: skip the other blocks while the first block's output changed by less "
                       "than this (relative)",
    "loras": 'LoRA adapters: [{"name": "...", "scale": 0.8}, ...] or ["name", ...]',
    "controls": 'ControlNet / T2I-Adapter inputs: [{"model": "...", "image": "<base64>", "scale": 1.0, "start": 0.0, '
                '"end": 1.0, "preprocessor": "none" or "canny"}, ...] (or AUTOMATIC1111\'s '
                'alwayson_scripts.controlnet)',
    "image": "start image (img2img, inpainting): base64 PNG/JPEG/WebP or a data: URL",
    "mask": "inpainting mask, same encodings: white = repaint, black = keep; needs image",
    "strength": "with image: how much of the schedule runs (default 0.8, or 1.0 with a mask)",
}
ALIASES: dict[str, str] = {
    "denoising_limit": "high_noise_frac",
    "num_images_per_prompt": "num_images",
    "output_image_format": "format",
    # as replicate's cog-sdxl and the AUTOMATIC1111 API name them
    "prompt_strength": "strength",
    "denoising_strength": "strength",
    "init_images": "image",
    "num_outputs": "num_images",
    "steps": "num_inference_steps",
    "cfg_scale": "guidance_scale",
    "sampler_name": "scheduler",
}
MAX_LORAS = 8
# Fields only some model families read; the others would silently ignore them, so they are refused.
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_2": ("sdxl", "sd3", "flux"),
    "negative_prompt_2": ("sdxl", "sd3", "flux"),
    "true_cfg_scale": ("flux",),
    "prompt_3": ("sd3",),
    "skip_guidance_layers": ("sd3",),
    "skip_layer_guidance_scale": ("sd3",),
    "skip_layer_guidance_start": ("sd3",),
    "skip_layer_guidance_stop": ("sd3",),
    "negative_prompt_3": ("sd3",),
    "original_size": ("sdxl",),
    "crops_coords_top_left": ("sdxl",),
    "target_size": ("sdxl",),
    # the SD and SDXL pipelines' eta and timesteps arguments; SD3's flow samplers have no spacing
    "eta": ("sd", "sdxl"),
    "timestep_spacing": ("sd", "sdxl"),
    "timesteps": ("sd", "sdxl"),
    # CLIP-only families: SD3 reads its T5 prompt up to 256 tokens, without weights
    "prompt_syntax": ("sd", "sdxl"),
}
# Why a family refuses a field, where it helps to know.
FAMILY_NOTES = {
    "prompt_syntax": " (SD3 and FLUX.1 read long prompts through their T5 encoder: up to 256 tokens of SD3's "
                     "prompt_3 and 512 of FLUX's prompt_2, or of prompt when those are absent; their CLIP encoders "
                     "read 77; weights are for SD 1.x/2.x and SDXL)",
}
LORA_SCALE = 2.0  # scales from -2 to 2
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1"}


def family_names(families: tuple[str, ...]) -> str:
    """``("sdxl", "sd3", "flux")`` as "SDXL, SD3 and FLUX.1"."""
    names = [FAMILY_NAMES[f] for f in families]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


class AdapterCatalog(Protocol):
    """The LoRA adapters a request may name (names are looked up, never used as paths)."""

    def exists(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...


def field_keys(values: Mapping[str, Any], where: str = "") -> dict[str, str]:
    """Each field's canonical name -> the key the client gave it as; raises InvalidInput on an
    unknown name or a field given twice (by its name and an alias, or two aliases)."""
    given_as: dict[str, str] = {}
    for key in values:
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            raise InvalidInput(
                f"{where}{key}: unknown field; allowed fields: {', '.join(sorted(FIELDS))} "
                f"(aliases: {', '.join(f'{a}={n}' for a, n in sorted(ALIASES.items()))})"
            )
        if name in given_as:
            raise InvalidInput(f"{where}{key}: given twice (as {name} and an alias)")
        given_as[name] = key
    return given_as
