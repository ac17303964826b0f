"""Finds the model under the model directory and loads it: base pipeline plus optional refiner.

Layouts understood (``--model_dir``, ``/mnt/models`` on KServe):

* a diffusers folder (``model_index.json``) at the root;
* ``base/`` (a diffusers folder) with an optional ``refiner/`` beside it; other entries are ignored;
* an explicit ``--refiner_dir`` with either;
* a single-file checkpoint (one ``.safetensors`` in the original layout, as the file itself or the
  only one at the folder's root) with its diffusers configs and tokenizers from ``--config_dir``
  (default: a ``config/`` folder beside it).

Loading is local and offline: safetensors only, no remote code, no hub access. The SDXL refiner
shares ``text_encoder_2`` and ``vae`` with the base, so they are held in memory once.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .request import ModelCapabilities

log = logging.getLogger("sdserve")

# Pipelines sdserve can drive, by the class name in model_index.json: their model family.
TEXT_TO_IMAGE_PIPELINES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd",
    "StableDiffusion3Pipeline": "sd3",
}
# Inpainting models: a UNet with extra input channels for the mask and the masked image.
INPAINT_PIPELINES = {"StableDiffusionInpaintPipeline": "sd", "StableDiffusionXLInpaintPipeline": "sdxl"}
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"  # also served alone, as an image-to-image model
SERVED_PIPELINES = {**TEXT_TO_IMAGE_PIPELINES, **INPAINT_PIPELINES, REFINER_PIPELINE: "sdxl"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class ModelStoreError(RuntimeError):
    """The model directory is missing, malformed, or holds something sdserve cannot serve."""


@dataclass(frozen=True)
class ModelLayout:
    base: Path  # a diffusers folder, or the single-file checkpoint
    refiner: Path | None = None
    config: Path | None = None  # for a single-file base: the diffusers folder with its configs

    @property
    def index_folder(self) -> Path:
        """Where the base's model_index.json is."""
        return self.config if self.config is not None else self.base


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


def _listing(path: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(entries[:20]) + (" ..." if len(entries) > 20 else "") if entries else "(empty)"


def _single_file(path: Path, config_dir: str | Path | None) -> ModelLayout:
    if path.suffix != ".safetensors":
        raise ModelStoreError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    config = Path(config_dir) if config_dir else path.parent / "config"
    if not (config / "model_index.json").is_file():
        raise ModelStoreError(
            f"single-file checkpoint {path} needs its diffusers configs: give --config_dir, a diffusers "
            f"folder with model_index.json, the component configs and tokenizers (no weights needed); "
            f"{config} has no model_index.json"
        )
    return ModelLayout(base=path, config=config)


def discover(
    model_dir: str | Path, refiner_dir: str | Path | None = None, config_dir: str | Path | None = None
) -> ModelLayout:
    """Work out where the base (and refiner) pipelines are, or fail saying what was found."""
    root = Path(model_dir)
    if root.is_file():
        return _single_file(root, config_dir)
    if not root.is_dir():
        raise ModelStoreError(f"model directory {root} does not exist or is not a directory")
    explicit_refiner = Path(refiner_dir) if refiner_dir else None
    checkpoints = sorted(root.glob("*.safetensors"))
    if (root / "model_index.json").is_file():
        layout = ModelLayout(base=root, refiner=explicit_refiner)
    elif (root / "base" / "model_index.json").is_file():
        refiner = explicit_refiner
        if refiner is None and (root / "refiner").is_dir():
            refiner = root / "refiner"
        layout = ModelLayout(base=root / "base", refiner=refiner)
    elif len(checkpoints) == 1:
        layout = _single_file(checkpoints[0], config_dir)
    else:
        raise ModelStoreError(
            f"no diffusers model found in {root}: expected model_index.json at its root, a base/ "
            f"folder holding one (with an optional refiner/ beside it), or one single-file .safetensors "
            f"checkpoint; found: {_listing(root)}"
        )
    if layout.refiner is not None and not (layout.refiner / "model_index.json").is_file():
        where = layout.refiner
        found = _listing(where) if where.is_dir() else "nothing (no such directory)"
        raise ModelStoreError(f"refiner directory {where} has no model_index.json; found: {found}")
    return layout


def read_model_index(folder: Path) -> dict[str, Any]:
    """The parsed model_index.json of a diffusers folder, checked for a pipeline class name."""
    path = folder / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"cannot read {path}: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ModelStoreError(f"{path} is malformed: it has no '_class_name' naming the pipeline")
    return index


def _components(index: dict[str, Any]) -> list[str]:
    """Component folders named in a model index (entries like ``"unet": ["diffusers", "..."]``)."""
    return [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0]
    ]


def _variants(files: list[str]) -> set[str | None]:
    """Weight variants present among file names: None for plain weights, "fp16" for
    ``*.fp16.safetensors`` (and the matching sharded index files)."""
    found: set[str | None] = set()
    for name in files:
        if name.endswith(".safetensors"):
            parts = name[: -len(".safetensors")].split(".")
            found.add(parts[1] if len(parts) > 1 else None)
        elif ".safetensors.index" in name and name.endswith(".json"):
            found.add(name.split(".safetensors.index")[1][: -len(".json")].lstrip(".") or None)
    return found


def weight_variant(folder: Path, index: dict[str, Any]) -> str | None:
    """Check every component has safetensors weights; return the variant to load ("fp16" when a
    component has only ``*.fp16.safetensors``), or None for plain weights.

    Pickle weights are refused: loading them can run arbitrary code.
    """
    needed: set[str] = set()
    for name in _components(index):
        comp = folder / name
        if not comp.is_dir():
            raise ModelStoreError(f"{folder}: component folder {name}/ named in model_index.json is missing")
        files = [p.name for p in comp.iterdir() if p.is_file()]
        variants = _variants(files)
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if not variants and pickles:
            raise ModelStoreError(
                f"{comp} holds only pickle weights ({', '.join(pickles)}); sdserve loads safetensors "
                f"only. Convert them, e.g. load and save_pretrained(safe_serialization=True)"
            )
        if variants and None not in variants:
            needed |= variants
    if len(needed) > 1:
        raise ModelStoreError(f"{folder}: components disagree on the weight variant: {sorted(needed)}")
    return next(iter(needed), None)


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
    denoiser = base.transformer if family == "sd3" else base.unet
    size = denoiser.config.sample_size * base.vae_scale_factor
    capabilities = ModelCapabilities(
        pipeline_class=class_name,
        default_width=size,
        default_height=size,
        default_steps=default_steps or defaults["num_inference_steps"].default,
        default_guidance_scale=float(defaults["guidance_scale"].default),
        family=family,
        has_refiner=refiner is not None,
        scheduler_class=type(base.scheduler).__name__,
        has_t5=getattr(base, "text_encoder_3", None) is not None,
        needs_mask=family != "sd3" and denoiser.config.in_channels != base.vae.config.latent_channels,
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
