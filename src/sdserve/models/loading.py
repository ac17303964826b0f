"""Loading the pipelines of a discovered model (``layout.py``) onto their device: the base pipeline
plus the optional refiner.

Loading is local and offline: safetensors only, no remote code, no hub access. The SDXL refiner
shares ``text_encoder_2`` and ``vae`` with the base, so they are held in memory once.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .capabilities import ModelCapabilities
from .layout import (
    INPAINT_PIPELINES,
    REFINER_PIPELINE,
    SERVED_PIPELINES,
    ModelLayout,
    ModelStoreError,
    read_model_index,
    weight_variant,
)

log = logging.getLogger("sdserve")


@dataclass(frozen=True)
class LoadOptions:
    """How to place the pipelines: all on the device, or offloaded to host memory between uses."""

    offload: str = "none"  # none | model (whole models move on demand) | sequential (layer by layer)
    vae_tiling: bool = False  # decode large images in tiles: less memory, seams are blended
    vae_slicing: bool = False  # decode a batch one image at a time
    drop_t5: bool = False  # SD3: leave out the T5-XXL encoder (~9 GB in fp16); prompts use CLIP only

    def __post_init__(self) -> None:
        if self.offload not in ("none", "model", "sequential"):
            raise ValueError(f"offload must be none, model or sequential, got {self.offload!r}")


@dataclass
class LoadedModel:
    """The pipelines, ready on their device, and what requests may ask of them."""

    base: Any  # a diffusers text-to-image pipeline
    refiner: Any | None
    capabilities: ModelCapabilities
    layout: ModelLayout
    device: torch.device
    dtype: torch.dtype
    # The schedulers as loaded: every call builds its scheduler from these, never from the one an
    # earlier request left on the pipeline.
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    refiner_scheduler_config: dict[str, Any] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelStoreError("--device cuda was asked for but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _load_pipeline(cls, layout_base: Path, index: dict[str, Any], dtype: torch.dtype, config: Path | None = None,
                   **components):
    if config is not None:  # single file, configs and tokenizers from a local folder
        loader = cls.from_single_file
        args = dict(config=str(config), local_files_only=True, dtype=dtype, **components)
        source = str(layout_base)
    else:
        variant = weight_variant(layout_base, index)
        loader = cls.from_pretrained
        args = dict(dtype=dtype, use_safetensors=True, local_files_only=True, variant=variant, **components)
        source = layout_base
    try:
        return loader(source, **args)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelStoreError(f"failed to load {cls.__name__} from {layout_base}: {exc}") from exc


def _place(pipeline, device: torch.device, options: LoadOptions):
    """Move the pipeline to ``device``, or set up offloading to it; then memory savers."""
    if options.offload == "none":
        pipeline.to(device)
    elif device.type == "cpu":
        raise ModelStoreError(f"--offload {options.offload} moves weights to a GPU on demand; it needs a CUDA device")
    elif options.offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.enable_sequential_cpu_offload(device=device)
    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    if options.vae_slicing:
        pipeline.vae.enable_slicing()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load(
    layout: ModelLayout,
    device: torch.device,
    dtype: torch.dtype,
    default_steps: int | None = None,
    options: LoadOptions = LoadOptions(),
) -> LoadedModel:
    """Load the base pipeline (class from its model_index.json) and the refiner, on ``device``."""
    import diffusers

    base_index = read_model_index(layout.index_folder)
    class_name = base_index["_class_name"]
    if class_name not in SERVED_PIPELINES:
        raise ModelStoreError(
            f"{layout.base}: pipeline class {class_name} is not supported; "
            f"supported: {', '.join(SERVED_PIPELINES)}"
        )
    family = SERVED_PIPELINES[class_name]
    cls = getattr(diffusers, class_name)
    extra: dict[str, Any] = {}
    if family == "sd":
        # Served images are not silently blacked out; filtering belongs in front of the server.
        extra = {"safety_checker": None, "requires_safety_checker": False}
    if family == "sd3" and options.drop_t5:
        extra = {"text_encoder_3": None, "tokenizer_3": None}
    if family == "flux" and options.drop_t5:
        raise ModelStoreError("--drop_t5: FLUX reads its prompt through T5 (text_encoder_2) and cannot go without it; "
                              "to save memory load the model in bfloat16 (--dtype bfloat16: T5-XXL takes 9.5 GB)")
    log.info("loading %s from %s (%s, %s)", class_name, layout.base, device, dtype)
    base = _place(_load_pipeline(cls, layout.base, base_index, dtype, layout.config, **extra), device, options)

    refiner = None
    if layout.refiner is not None:
        refiner_index = read_model_index(layout.refiner)
        refiner_class = refiner_index["_class_name"]
        if class_name != "StableDiffusionXLPipeline" or refiner_class != REFINER_PIPELINE:
            raise ModelStoreError(
                f"refiner {layout.refiner} is a {refiner_class} for a {class_name} base; a refiner "
                f"must be a {REFINER_PIPELINE} next to a StableDiffusionXLPipeline base"
            )
        log.info("loading refiner from %s, sharing text_encoder_2 and vae with the base", layout.refiner)
        refiner = _place(
            _load_pipeline(
                diffusers.StableDiffusionXLImg2ImgPipeline,
                layout.refiner,
                refiner_index,
                dtype,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
            ),
            device,
            options,
        )

    defaults = inspect.signature(cls.__call__).parameters
    denoiser = base.transformer if hasattr(base, "transformer") else base.unet
    # FLUX's transformer has no sample size: its pipeline's default_sample_size (128 latents: 1024 px)
    size = (base.default_sample_size if family == "flux" else denoiser.config.sample_size) * base.vae_scale_factor
    steps, guidance = defaults["num_inference_steps"].default, float(defaults["guidance_scale"].default)
    embedded = bool(getattr(denoiser.config, "guidance_embeds", False))
    if family == "flux" and not embedded:  # FLUX.1 [schnell]'s card: 4 steps, no guidance (FluxPipeline: 28, 3.5)
        steps, guidance = 4, 0.0
    capabilities = ModelCapabilities(
        pipeline_class=class_name,
        default_width=size,
        default_height=size,
        default_steps=default_steps or steps,
        default_guidance_scale=guidance,
        family=family,
        has_refiner=refiner is not None,
        scheduler_class=type(base.scheduler).__name__,
        has_t5=getattr(base, "text_encoder_3", None) is not None,
        needs_mask=class_name in INPAINT_PIPELINES,
        size_multiple=16 if family == "flux" else 8,  # FLUX packs 2x2 latents: 16 pixels a side
        guidance_embedded=embedded,
        transformer_layers=denoiser.config.num_layers if family == "sd3" else 0,
        needs_image=class_name == REFINER_PIPELINE,
        num_train_timesteps=base.scheduler.config.get("num_train_timesteps", 1000),
    )
    return LoadedModel(
        base,
        refiner,
        capabilities,
        layout,
        device,
        dtype,
        scheduler_config=dict(base.scheduler.config),
        refiner_scheduler_config=dict(refiner.scheduler.config) if refiner is not None else None,
    )
