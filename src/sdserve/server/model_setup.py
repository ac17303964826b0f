"""What ``SDModel.load()`` builds on the engine's worker thread: the model from the store, its
adapters, the request parser, the previewer and the optimisations; and the warm-up plan."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kserve.errors import InvalidInput

from ..adapters import Adapters, open_store
from ..controls import ControlCatalog, LoadedControls
from ..generation import ModelBackend
from ..generation.policy import buckets
from ..generation.preview import Previewer
from ..models import loading, optimize, storage
from ..models.embeddings import PromptVocabulary, load_embeddings
from ..models.layout import ModelStoreError, discover
from ..models.optimize import Optimizations
from ..request import recipes
from ..request.controls import CONTROL_FAMILIES
from ..request.fields import FAMILY_FIELDS
from ..request.prompt_syntax import PromptSettings
from ..request.prompts import counting_tokenizers
from ..request.step_savings import SavingsDefaults
from ..request.types import GenerationRequest, Limits
from ..request.validation import RequestParser
from .preview_setup import model_previewer

log = logging.getLogger("sdserve")


@dataclass(frozen=True)
class ModelSettings:
    model_dir: str
    refiner_dir: str | None = None
    config_dir: str | None = None  # diffusers configs for a single-file checkpoint
    lora_dir: str | None = None  # default: <model_dir>/loras
    control_dir: str | None = None  # ControlNets / T2I-Adapters / IP-Adapters; default: <model_dir>/controls
    max_loaded_controls: int = 8  # control models loaded at once (least recently used out)
    preview_vae: str | None = None  # --preview_vae: AutoencoderTiny folder for partial images
    device: str = "auto"
    dtype: str = "auto"
    default_steps: int | None = None
    lora_relist_seconds: float = 10.0  # a request naming an unknown adapter lists the store at most this often
    fuse_lora: tuple[str, float | None] | None = None  # --fuse_lora NAME[:SCALE]; scale None: the recipe's, else 1
    max_loaded_adapters: int | None = 16  # LoRA adapters loaded at once (least recently used out); None: all
    embeddings_dir: str | None = None  # textual-inversion embeddings; default: <model_dir>/embeddings
    prompt_syntax: str = "plain"  # how a request that does not say reads its prompts
    savings: SavingsDefaults = SavingsDefaults()  # --guidance_interval, --cache...
    download_dir: str | None = None  # where remote model locations are downloaded to
    load_options: loading.LoadOptions = loading.LoadOptions()
    optimizations: Optimizations = Optimizations()


@dataclass
class Served:
    """A loaded model and what serves it."""

    loaded: loading.LoadedModel
    adapters: Adapters
    parser: RequestParser
    tokenizers: dict[str, Any]  # private copies, for counting prompt tokens on request threads
    weighted_tokenizers: dict[str, Any]  # the same for weighted prompts (they know the embeddings' tokens)
    controls: ControlCatalog | None  # the control models requests may name (SD and SDXL models)
    previewer: Previewer | None
    preview_error: str | None  # why there are no previews (previewer None)
    backend: ModelBackend


def prepare(name: str, s: ModelSettings, limits: Limits) -> Served:
    """Load the model and its adapters, optimise, and build what requests are checked against.
    Raises ModelStoreError when the model or an adapter flag cannot be served."""
    started = time.perf_counter()
    model_dir = storage.local_path(s.model_dir, s.download_dir)
    refiner_dir = storage.local_path(s.refiner_dir, s.download_dir) if s.refiner_dir else None
    layout = discover(model_dir, refiner_dir, s.config_dir)
    device = loading.resolve_device(s.device)
    dtype = loading.resolve_dtype(s.dtype, device)
    loaded = loading.load(layout, device, dtype, s.default_steps, s.load_options)
    caps = loaded.capabilities
    store = open_store(s.lora_dir or Path(model_dir) / "loras", s.download_dir)
    adapters = Adapters(store, s.lora_relist_seconds, check=recipes.checker(limits, caps), fuse=s.fuse_lora,
                        max_loaded=s.max_loaded_adapters)
    adapters.load_all(loaded.base)
    vocabulary, prompts = _prompt_vocabulary(s, caps.family, loaded, Path(model_dir))
    controls = _control_catalog(s, loaded, Path(model_dir))
    parser = RequestParser(limits, caps, adapters, prompts, s.savings, controls)
    previewer, preview_error = model_previewer(loaded, s.preview_vae, s.download_dir)
    opts = s.optimizations
    done = optimize.apply(loaded.base, opts)
    if loaded.refiner is not None:
        optimize.apply(loaded.refiner, opts, include_vae=False)
    if done:
        log.info("optimisations: %s", ", ".join(done))
    log.info(
        "model %s loaded in %.1f s: %s%s on %s (%s)%s%s",
        name,
        time.perf_counter() - started,
        caps.pipeline_class,
        " + refiner" if loaded.refiner is not None else "",
        device,
        dtype,
        f", LoRA adapters: {', '.join(adapters.names())}" if adapters.names() else "",
        f", fused LoRA {adapters.fused.name} (scale {adapters.fused.scale:g})" if adapters.fused else "",
    )
    backend = ModelBackend(loaded, adapters, pad_rows=opts.compile != "none", pad_decode=opts.compile == "all",
                           vocabulary=vocabulary,
                           controls=LoadedControls(controls, device, dtype, loaded.base.unet, s.max_loaded_controls)
                           if controls is not None else None)
    own = {name: getattr(loaded.base, name, None) for name in ("tokenizer", "tokenizer_2")}
    return Served(loaded, adapters, parser, counting_tokenizers(own), counting_tokenizers(vocabulary.tokenizers),
                  controls, previewer, preview_error, backend)


def _control_catalog(s: ModelSettings, loaded: loading.LoadedModel, model_dir: Path) -> ControlCatalog | None:
    """The control models of an SD 1.x/2.x or SDXL model (None for the others)."""
    caps = loaded.capabilities
    if caps.family not in CONTROL_FAMILIES or caps.needs_image:
        if s.control_dir:
            raise ModelStoreError(f"--control_dir: control models (ControlNet, T2I-Adapter, IP-Adapter) are for "
                                  f"SD 1.x/2.x and SDXL text-to-image models, not a {caps.pipeline_class}")
        return None
    return ControlCatalog(s.control_dir or model_dir / "controls", loaded.base.unet, s.lora_relist_seconds,
                          s.download_dir, required=bool(s.control_dir))


def _prompt_vocabulary(s: ModelSettings, family: str, loaded: loading.LoadedModel,
                       model_dir: Path) -> tuple[PromptVocabulary, PromptSettings]:
    """Weighted prompts' tokenizers with the textual-inversion embeddings (SD 1.x/2.x and SDXL:
    the CLIP-only families), and what the request parser checks prompts against."""
    if family not in FAMILY_FIELDS["prompt_syntax"]:
        if s.prompt_syntax != "plain":
            log.warning("--prompt_syntax %s: a %s model reads plain prompts only; requests default to plain",
                        s.prompt_syntax, loaded.capabilities.pipeline_class)
        if s.embeddings_dir:
            raise ModelStoreError(f"--embeddings_dir: textual-inversion embeddings are for SD 1.x/2.x and SDXL models, "
                                  f"not a {loaded.capabilities.pipeline_class}")
        return PromptVocabulary(), PromptSettings()
    folder = Path(storage.local_path(s.embeddings_dir, s.download_dir)) if s.embeddings_dir else model_dir / "embeddings"
    if s.embeddings_dir and not folder.is_dir():
        raise ModelStoreError(f"--embeddings_dir {s.embeddings_dir}: no such folder")
    vocabulary = load_embeddings(loaded.base, folder)
    return vocabulary, PromptSettings(s.prompt_syntax, vocabulary.names)


def warmup_plan(parser: RequestParser, sizes: tuple[tuple[int, int], ...],
                max_batch_images: int) -> list[tuple[str, list[GenerationRequest]]]:
    """For each --warmup size, denoiser calls of every padded row count (1, 2, 4, ... up to
    2 x --max_batch_images): compiled graphs are specialised to shapes, and none should compile
    while serving. One row is an image without guidance; two rows, an image with it."""
    plan = []
    for width, height in sizes:
        for rows in buckets(2 * max_batch_images):
            values = {"prompt": "warm-up", "width": width, "height": height, "num_inference_steps": 2, "seed": 0,
                      "guidance_scale": 1.0 if rows == 1 else 5.0}
            images = max(1, rows // 2)
            try:
                requests = [parser.parse({**values, "num_images": 1}) for _ in range(images)]
            except InvalidInput as exc:
                raise ModelStoreError(f"--warmup: {exc.reason}") from None
            plan.append((f"{width}x{height}, {rows} denoiser row(s)", requests))
    return plan
