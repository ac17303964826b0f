"""LoRA adapters: one folder per adapter in ``--lora_dir`` (default ``<model_dir>/loras``), a local
folder or a remote store (``locations.py``: ``s3://...`` and the other schemes the model store
reads), each holding diffusers-format LoRA weights (``pytorch_lora_weights.safetensors``, as
diffusers' DreamBooth LoRA training saves them).

A local folder's adapters load at start-up as named peft adapters on the base pipeline (up to
``--max_loaded_adapters``, see ``resident.py``); a remote store's are listed at start-up and each is
downloaded on first use, by the request thread (``fetch``), before its request queues. An adapter added later is found the first time a request
names it: the store is listed again, at most once every ``rescan_seconds`` (``--lora_relist_seconds``),
so every replica serves a new upload without a restart. The worker loads it when that request is
admitted; the base weights stay as they are. Request names are only ever compared with the names
listed, never joined into a path.

A folder may also hold a recipe (``sdserve.json``, see ``request/recipes.py``): read and validated at each
listing; an adapter whose recipe is refused is not offered. ``--fuse_lora NAME[:SCALE]`` fuses one
adapter into the base weights at start-up: requests pay no LoRA cost for it, cannot name it, and
get its recipe as the server's defaults.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from .. import metrics
from ..models.layout import ModelStoreError
from ..request.fields import LORA_SCALE
from ..request.recipes import RECIPE_FILE, Check, Fused, Recipe, RecipeError, read_recipe
from .resident import ResidentAdapters
from .store import NAME, AdapterFetchError, Listed, LocalStore

log = logging.getLogger("sdserve")

__all__ = ["NAME", "AdapterFetchError", "Adapters", "parse_fuse_lora"]


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
    """The adapters in the store and their recipes (shared by request threads); once
    :meth:`load_all` ran, ``resident`` holds those loaded into the pipeline (the worker thread's)."""

    def __init__(self, store, rescan_seconds: float = 5.0, check: Check | None = None,
                 fuse: tuple[str, float | None] | None = None, max_loaded: int | None = None):
        """``store`` is a store of ``locations.py``, or a local folder (None: no adapters);
        ``check`` validates a recipe's generation fields against the loaded model (without it,
        only the recipe's form and keys are checked); ``fuse`` is ``--fuse_lora``, done by
        :meth:`load_all`; ``max_loaded`` bounds the adapters loaded at once (None: no bound).
        Listing the store fails here (ModelStoreError) when it cannot be read."""
        self.store = store if hasattr(store, "list") else LocalStore(Path(store) if store is not None else None)
        self.rescan_seconds = rescan_seconds
        self.check = check
        self.fuse = fuse
        self.fused: Fused | None = None
        self._found: dict[str, Listed] = {}
        self._recipes: dict[str, Recipe] = {}
        self._local: dict[str, Path] = {}  # adapter -> its weights on local disk, once fetched
        self.refused: dict[str, str] = {}  # adapter -> why its recipe is refused
        self.list_error: str | None = None  # why the last listing failed; None when it worked
        self._skipped: dict[str, str] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one listing at a time; the others wait for its answer
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._failed: set[str] = set()  # adapters whose last fetch failed
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded_adapters must be at least 1, got {max_loaded}")
        self.max_loaded = max_loaded
        self.resident: ResidentAdapters | None = None
        self.scan()

    @property
    def location(self) -> str:
        return self.store.location

    def scan(self) -> dict[str, Listed]:
        """List the store again; folders with a bad name or no usable weights are skipped with a
        warning (pickle weights are refused, as for models). Raises ModelStoreError when the store
        cannot be listed."""
        self._scanned_at = time.monotonic()  # a failed listing waits its turn too
        try:
            found, skipped = self.store.list()
        except ModelStoreError as exc:
            metrics.LORA_LISTINGS.labels(result="error").inc()
            self.list_error = str(exc)
            raise
        metrics.LORA_LISTINGS.labels(result="ok").inc()
        self.list_error = None
        for name, reason in skipped.items():
            if self._skipped.get(name) != reason:  # said once, not at every listing
                log.warning("LoRA folder %s in %s skipped: %s", name, self.location, reason)
        recipes, refused = {}, {}
        for name in list(found):
            if self.fused is not None and name == self.fused.name:
                del found[name]  # in the base weights now
                continue
            if found[name].recipe_dir is None:
                continue
            try:
                recipe = read_recipe(found[name].recipe_dir, self.check)
            except RecipeError as exc:
                refused[name] = str(exc)
                if self.refused.get(name) != refused[name]:
                    log.warning("LoRA adapter %s not offered: %s/%s/%s refused: %s", name, self.location.rstrip("/"),
                                name, RECIPE_FILE, exc)
                del found[name]
                continue
            if recipe is not None:
                recipes[name] = recipe
        with self._lock:
            self._found, self._recipes, self.refused, self._skipped = found, recipes, refused, skipped
        return found

    def names(self) -> list[str]:
        return sorted(self._found)

    def recipe(self, name: str) -> Recipe | None:
        """The recipe of adapter ``name``, None when it has none or is not offered."""
        return self._recipes.get(name) if self.exists(name) else None

    def recipes(self) -> dict[str, Recipe]:
        return {name: self._recipes[name] for name in self.names() if name in self._recipes}

    def exists(self, name: str) -> bool:
        """Is ``name`` an adapter in the store? A miss lists the store again (rate-limited)."""
        if name not in self._found:
            self._relist(name)
        return name in self._found

    def _relist(self, name: str) -> None:
        """List the store again for ``name``, unless it was listed less than ``rescan_seconds``
        ago; a listing that fails keeps the adapters listed before."""
        with self._scan_lock:  # one listing at a time; the others wait for its answer
            if name in self._found and name not in self._failed:
                return  # the listing this thread waited for found it
            if time.monotonic() - self._scanned_at >= self.rescan_seconds:
                try:
                    self.scan()
                except ModelStoreError as exc:
                    log.warning("%s; the adapters listed before stay", exc)

    def fetch(self, names) -> None:
        """Bring the weights of adapters ``names`` to local disk (a remote store downloads each
        once); called by request threads before queueing, so no download stalls the worker.
        Raises AdapterFetchError naming the adapter; the next request for it lists the store
        again first (rate-limited), so an adapter fixed in the store is picked up."""
        for name in names:
            if name in self._local:
                continue
            if name in self._failed:
                self._relist(name)
            with self._lock:
                lock = self._fetch_locks.setdefault(name, threading.Lock())
            with lock:  # concurrent requests for a new adapter download it once
                if name not in self._local:
                    try:
                        self._local[name] = self._fetch_one(name)
                    except AdapterFetchError:
                        self._failed.add(name)
                        raise
                    self._failed.discard(name)

    def _fetch_one(self, name: str) -> Path:
        listed = self._found.get(name)
        if listed is None:
            raise AdapterFetchError(f"LoRA adapter {name} is no longer in {self.location}")
        remote = not self.store.preload
        try:
            path = self.store.fetch(name, listed)
        except AdapterFetchError as exc:
            if remote:
                metrics.LORA_DOWNLOADS.labels(result="error").inc()
            raise AdapterFetchError(f"LoRA adapter {name} could not be fetched from {self.location}: {exc}") from None
        if remote:
            metrics.LORA_DOWNLOADS.labels(result="ok").inc()
        return path

    def local_weights(self, name: str) -> Path:
        """The adapter's weights on local disk (fetched now if a request did not fetch them)."""
        if name not in self._local:
            self.fetch([name])
        return self._local[name]

    def offered(self, name: str) -> Listed | None:
        return self._found.get(name)

    def mark_fused(self, fused: Fused) -> None:
        """The adapter is in the base weights now: no request may name it, its recipe is the default."""
        with self._lock:
            self.fused = fused
            self._found = {n: p for n, p in self._found.items() if n != fused.name}
            self._recipes = {n: r for n, r in self._recipes.items() if n != fused.name}

    # -- the worker thread -----------------------------------------------------------------
    def load_all(self, pipeline) -> ResidentAdapters:
        """Fuse ``--fuse_lora`` into the base weights, then load the local store's adapters (up to
        the bound); a remote store's load on first use. Returns what is loaded, also ``resident``."""
        self.resident = ResidentAdapters(self, pipeline, self.max_loaded)
        self.resident.start(self.fuse, self.names() if self.store.preload else [])
        return self.resident
