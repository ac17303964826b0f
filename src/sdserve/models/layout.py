"""Finding the model under the model directory, and what sdserve can serve.

Layouts understood (``--model_dir``, ``/mnt/models`` on KServe):

* a diffusers folder (``model_index.json``) at the root;
* ``base/`` (a diffusers folder) with an optional ``refiner/`` beside it; other entries are ignored;
* an explicit ``--refiner_dir`` with either;
* a single-file checkpoint (one ``.safetensors`` in the original layout, as the file itself or the
  only one at the folder's root) with its diffusers configs and tokenizers from ``--config_dir``
  (default: a ``config/`` folder beside it).

Only safetensors weights are accepted: pickle files can run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Pipelines sdserve can drive, by the class name in model_index.json: their model family.
TEXT_TO_IMAGE_PIPELINES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# Inpainting models: a denoiser with extra input channels for the mask and the masked image.
INPAINT_PIPELINES = {"StableDiffusionInpaintPipeline": "sd", "StableDiffusionXLInpaintPipeline": "sdxl",
                     "FluxFillPipeline": "flux"}
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


