"""The adapters loaded into the pipeline, on the worker thread: loading on first use, the bound on
how many stay loaded (``--max_loaded_adapters``, least recently used first out, never one an
image in flight uses), the adapter fused at start-up, and how each call applies them.

The denoiser's adapters run through ``batched.py`` (per-row deltas, so images with different
adapters share a call); the text encoders' through peft as diffusers sets them, per request set,
when prompts are encoded.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)

from .. import metrics
from ..models.layout import ModelStoreError
from ..request.recipe_defaults import RECIPE_FILE
from ..request.recipes import Fused
from .batched import AdapterSet, BatchedLoRA
from .store import AdapterFetchError

log = logging.getLogger("sdserve")


class Listing(Protocol):
    """What loading needs of the adapters' listing (``library.Adapters``)."""

    fused: Fused | None
    refused: dict[str, str]
    location: str

    def names(self) -> list[str]: ...

    def offered(self, name: str) -> Any: ...

    def recipe(self, name: str) -> Any: ...

    def local_weights(self, name: str) -> Path: ...

    def mark_fused(self, fused: Fused) -> None: ...


def _denoiser(pipeline) -> torch.nn.Module:
    return pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet


class ResidentAdapters:
    """Owned by the worker thread, like the pipeline it changes."""

    def __init__(self, library: Listing, pipeline, max_loaded: int | None = None):
        self.library = library
        self.pipeline = pipeline
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, bool] = OrderedDict()  # name -> batched path serves it; oldest use first
        self.batched = BatchedLoRA(_denoiser(pipeline))
        metrics.LORA_RESIDENT.set(0)

    def start(self, fuse: tuple[str, float | None] | None, preload: list[str]) -> None:
        if fuse is not None and self.library.fused is None:
            self._fuse(*fuse)
        for name in preload[: self.max_loaded]:
            self._load(name)

    # -- loading and eviction ------------------------------------------------------------------
    def ensure(self, names: set[str], in_use: set[str]) -> None:
        """Load ``names`` that are not loaded, first unloading the least recently used adapters
        beyond the bound that neither ``names`` nor ``in_use`` (images in flight) holds. The bound
        gives way while more adapters than it are in flight at once, until the next admission."""
        self._evict(keep=names | in_use, room_for=0)
        for name in sorted(names):
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            self._evict(keep=names | in_use, room_for=1)
            self._load(name)

    def _evict(self, keep: set[str], room_for: int) -> None:
        if self.max_loaded is None:
            return
        for name in [n for n in self.loaded if n not in keep]:
            if len(self.loaded) + room_for <= self.max_loaded:
                return
            self.pipeline.delete_adapters([name])
            del self.loaded[name]
            metrics.LORA_EVICTIONS.inc()
            log.info("unloaded LoRA adapter %s (least recently used; --max_loaded_adapters %d)", name,
                     self.max_loaded)
        self._changed()

    def _load(self, name: str) -> None:
        path = self.library.local_weights(name)
        started = time.perf_counter()
        try:
            self.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            metrics.LORA_LOADS.labels(result="error").inc()
            with contextlib.suppress(Exception):  # a half-loaded adapter must not stay behind
                self.pipeline.delete_adapters([name])
            self._changed()
            raise ModelStoreError(f"LoRA adapter {name} ({path}) does not fit this model: {exc}") from exc
        self.batched.refresh()  # hooks on the new layers first: servable() looks at them
        self.loaded[name] = self.batched.servable(name)
        self._changed()
        metrics.LORA_LOADS.labels(result="ok").inc()
        log.info("loaded LoRA adapter %s in %.2f s%s", name, time.perf_counter() - started,
                 "" if self.loaded[name] else " (DoRA or another peft variant: its images get calls of their own)")

    def _changed(self) -> None:
        self.batched.refresh()
        metrics.LORA_RESIDENT.set(len(self.loaded))

    def _fuse(self, name: str, scale: float | None) -> None:
        """Fuse adapter ``name`` into the base weights, before any other adapter is loaded (the
        unload that follows removes every peft layer)."""
        library = self.library
        if library.offered(name) is None:
            if name in library.refused:
                raise ModelStoreError(f"--fuse_lora {name}: its {RECIPE_FILE} is refused: {library.refused[name]}")
            available = ", ".join(library.names()) or "none"
            raise ModelStoreError(f"--fuse_lora {name}: no adapter named {name!r} in {library.location}; "
                                  f"available: {available}")
        recipe = library.recipe(name)
        if scale is None:
            scale = recipe.scale if recipe is not None and recipe.scale is not None else 1.0
        try:
            self._load(name)
        except AdapterFetchError as exc:
            raise ModelStoreError(f"--fuse_lora {name}: {exc}") from None
        started = time.perf_counter()
        try:
            self.pipeline.fuse_lora(adapter_names=[name], lora_scale=scale)
            self.pipeline.unload_lora_weights()
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelStoreError(f"--fuse_lora {name}: cannot fuse it into this model: {exc}") from exc
        del self.loaded[name]
        self._changed()
        library.mark_fused(Fused(name, scale, recipe))
        log.info("fused LoRA adapter %s (scale %g) into the base weights in %.2f s%s", name, scale,
                 time.perf_counter() - started, f"; its recipe is the default: {recipe.describe()}" if recipe else "")

    # -- using them ---------------------------------------------------------------------------
    def exclusive(self, adapters: AdapterSet) -> bool:
        """Must images with these adapters have denoiser calls of their own (peft's path)?"""
        return any(not self.loaded.get(name, True) for name, _ in adapters)

    def text_encoder_adapters(self, adapters: AdapterSet) -> AdapterSet:
        """Those of ``adapters`` that change a text encoder (requests encode apart by them)."""
        encoders = self._text_encoders()
        return tuple((n, s) for n, s in adapters if any(n in e.peft_config for e in encoders))

    def _text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders that have LoRA layers."""
        found = []
        for component in getattr(self.pipeline, "_lora_loadable_modules", ()):
            encoder = getattr(self.pipeline, component, None)
            if encoder is not None and encoder is not self.batched.denoiser and getattr(encoder, "peft_config", None):
                found.append(encoder)
        return found

    def for_text_encoders(self, adapters: AdapterSet) -> None:
        """Make the text encoders' LoRA layers apply exactly ``adapters`` (before encoding prompts)."""
        for encoder in self._text_encoders():
            names = [n for n, _ in adapters if n in encoder.peft_config]
            if names:
                set_adapters_for_text_encoder(names, encoder, [s for n, s in adapters if n in encoder.peft_config])
                enable_lora_for_text_encoder(encoder)
            else:
                disable_lora_for_text_encoder(encoder)

    def for_call(self, rows: list[AdapterSet], device: torch.device):
        """What applies the adapters during one denoiser call whose row i has ``rows[i]``."""
        if rows and self.exclusive(rows[0]):  # the policy gave an exclusive set a call of its own
            return self.batched.exclusive(rows[0])
        return self.batched.rows(rows, device)
