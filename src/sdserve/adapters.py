"""LoRA adapters: one folder per adapter under ``--lora_dir`` (default ``<model_dir>/loras``), each
holding diffusers-format LoRA weights (``pytorch_lora_weights.safetensors``, as diffusers'
DreamBooth LoRA training saves them).

All adapters load at start-up as named peft adapters on the base pipeline. A folder added later is
found the first time a request names it (the listing is re-read at most every few seconds) and
loaded by the worker when that request is admitted; the base weights stay as they are. Request names
are only ever compared with the folder names found, never joined into a path.

A folder may also hold a recipe (``sdserve.json``, see ``recipes.py``): read and validated at each
scan; an adapter whose recipe is refused is not offered. ``--fuse_lora NAME[:SCALE]`` fuses one
adapter into the base weights at start-up: requests pay no LoRA cost for it, cannot name it, and
get its recipe as the server's defaults.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from pathlib import Path

from .fields import LORA_SCALE
from .model_store import PICKLE_SUFFIXES, ModelStoreError
from .recipes import RECIPE_FILE, Check, Fused, Recipe, RecipeError, read_recipe

log = logging.getLogger("sdserve")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHTS = "pytorch_lora_weights.safetensors"


def _weights_file(folder: Path) -> Path | None:
    """The adapter's safetensors file: the diffusers name, or the folder's only safetensors."""
    if (folder / WEIGHTS).is_file():
        return folder / WEIGHTS
    candidates = sorted(folder.glob("*.safetensors"))
    return candidates[0] if len(candidates) == 1 else None


def parse_fuse_lora(spec: str | None) -> tuple[str, float | None] | None:
    """``--fuse_lora NAME[:SCALE]`` as (name, scale or None: the recipe's scale, else 1);
    raises ValueError saying what is wrong."""
    if spec is None or spec == "":
        return None
    name, sep, scale_text = spec.partition(":")
    if not NAME.match(name):
        raise ValueError(f"--fuse_lora: {name!r} is not an adapter name (letters, digits, '.', '_', '-'); "
                         "give NAME or NAME:SCALE")
    if not sep:
        return name, None
    try:
        scale = float(scale_text)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or not -LORA_SCALE <= scale <= LORA_SCALE:
        raise ValueError(f"--fuse_lora: scale must be a number from {-LORA_SCALE} to {LORA_SCALE}, "
                         f"got {scale_text!r}")
    return name, scale


class Adapters:
    """The adapters on disk (shared by request threads) and those loaded into the pipeline (the
    worker thread's business)."""

    def __init__(self, lora_dir: Path | None, rescan_seconds: float = 5.0, check: Check | None = None,
                 fuse: tuple[str, float | None] | None = None):
        """``check`` validates a recipe's generation fields against the loaded model (without it,
        only the recipe's form and keys are checked); ``fuse`` is ``--fuse_lora``, done by
        :meth:`load_all`."""
        self.lora_dir = lora_dir
        self.rescan_seconds = rescan_seconds
        self.check = check
        self.fuse = fuse
        self.fused: Fused | None = None
        self._found: dict[str, Path] = {}
        self._recipes: dict[str, Recipe] = {}
        self.refused: dict[str, str] = {}  # adapter -> why its recipe is refused
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self._active: tuple[tuple[str, float], ...] | None = None  # what the pipeline has on now
        self.scan()

    def scan(self) -> dict[str, Path]:
        """Re-read the adapter folder; folders with a bad name or no usable weights are skipped
        with a warning (pickle weights are refused, as for models)."""
        found: dict[str, Path] = {}
        if self.lora_dir is not None and self.lora_dir.is_dir():
            for folder in sorted(p for p in self.lora_dir.iterdir() if p.is_dir()):
                weights = _weights_file(folder)
                if not NAME.match(folder.name):
                    log.warning("LoRA folder %s skipped: names are letters, digits, '.', '_', '-'", folder.name)
                elif weights is None:
                    pickles = [f.name for f in folder.iterdir() if f.name.endswith(PICKLE_SUFFIXES)]
                    reason = f"pickle weights are refused ({', '.join(pickles)})" if pickles else "no single .safetensors file"
                    log.warning("LoRA folder %s skipped: %s", folder, reason)
                else:
                    found[folder.name] = weights
        recipes, refused = {}, {}
        for name in list(found):
            if self.fused is not None and name == self.fused.name:
                del found[name]  # in the base weights now
                continue
            try:
                recipe = read_recipe(found[name].parent, self.check)
            except RecipeError as exc:
                refused[name] = str(exc)
                if self.refused.get(name) != refused[name]:  # said once, not at every re-scan
                    log.warning("LoRA adapter %s not offered: %s refused: %s", name,
                                found[name].parent / RECIPE_FILE, exc)
                del found[name]
                continue
            if recipe is not None:
                recipes[name] = recipe
        with self._lock:
            self._found, self._recipes, self.refused, self._scanned_at = found, recipes, refused, time.monotonic()
        return found

    def names(self) -> list[str]:
        return sorted(self._found)

    def recipe(self, name: str) -> Recipe | None:
        """The recipe of adapter ``name``, None when it has none or is not offered."""
        return self._recipes.get(name) if self.exists(name) else None

    def recipes(self) -> dict[str, Recipe]:
        return {name: self._recipes[name] for name in self.names() if name in self._recipes}

    def exists(self, name: str) -> bool:
        """Is ``name`` an adapter on disk? A miss re-reads the folder, at most every few seconds."""
        if name in self._found:
            return True
        if time.monotonic() - self._scanned_at >= self.rescan_seconds:
            self.scan()
        return name in self._found

    # -- the worker thread -----------------------------------------------------------------
    def load(self, pipeline, name: str) -> None:
        path = self._found[name]
        started = time.perf_counter()
        try:
            pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelStoreError(f"LoRA adapter {name} ({path}) does not fit this model: {exc}") from exc
        self._loaded.add(name)
        self._active = None  # loading may change which adapters are on
        log.info("loaded LoRA adapter %s in %.2f s", name, time.perf_counter() - started)

    def load_all(self, pipeline) -> None:
        if self.fuse is not None and self.fused is None:
            self._fuse_into(pipeline, *self.fuse)
        for name in self.names():
            self.load(pipeline, name)
        if self._loaded:
            pipeline.disable_lora()
        self._active = ()

    def _fuse_into(self, pipeline, name: str, scale: float | None) -> None:
        """Fuse adapter ``name`` into the base weights, before any other adapter is loaded (the
        unload that follows removes every peft layer)."""
        if name not in self._found:
            if name in self.refused:
                raise ModelStoreError(f"--fuse_lora {name}: its {RECIPE_FILE} is refused: {self.refused[name]}")
            available = ", ".join(self.names()) or "none"
            raise ModelStoreError(f"--fuse_lora {name}: no adapter named {name!r} in {self.lora_dir}; "
                                  f"available: {available}")
        recipe = self._recipes.get(name)
        if scale is None:
            scale = recipe.scale if recipe is not None and recipe.scale is not None else 1.0
        self.load(pipeline, name)
        started = time.perf_counter()
        try:
            pipeline.fuse_lora(adapter_names=[name], lora_scale=scale)
            pipeline.unload_lora_weights()
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelStoreError(f"--fuse_lora {name}: cannot fuse it into this model: {exc}") from exc
        self._loaded.discard(name)
        self._active = None
        with self._lock:
            self.fused = Fused(name, scale, recipe)
            self._found = {n: p for n, p in self._found.items() if n != name}
            self._recipes = {n: r for n, r in self._recipes.items() if n != name}
        log.info("fused LoRA adapter %s (scale %g) into the base weights in %.2f s%s", name, scale,
                 time.perf_counter() - started, f"; its recipe is the default: {recipe.describe()}" if recipe else "")

    def activate(self, pipeline, loras: tuple[tuple[str, float], ...]) -> None:
        """Make exactly ``loras`` active (none: the base model, bit for bit). The step loop calls
        this before every call of a group, so switching is skipped when nothing changes."""
        for name, _ in loras:
            if name not in self._loaded:
                self.load(pipeline, name)
        if not self._loaded or loras == self._active:
            return
        if loras:
            pipeline.enable_lora()
            pipeline.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
        else:
            pipeline.disable_lora()
        self._active = loras
