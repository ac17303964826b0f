"""LoRA adapters: one folder per adapter under ``--lora_dir`` (default ``<model_dir>/loras``), each
holding diffusers-format LoRA weights (``pytorch_lora_weights.safetensors``, as diffusers'
DreamBooth LoRA training saves them).

All adapters load at start-up as named peft adapters on the base pipeline. A folder added later is
found the first time a request names it (the listing is re-read at most every few seconds) and
loaded by the worker when that request is admitted; the base weights stay as they are. Request names
are only ever compared with the folder names found, never joined into a path.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

from .model_store import PICKLE_SUFFIXES, ModelStoreError

log = logging.getLogger("sdserve")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHTS = "pytorch_lora_weights.safetensors"


def _weights_file(folder: Path) -> Path | None:
    """The adapter's safetensors file: the diffusers name, or the folder's only safetensors."""
    if (folder / WEIGHTS).is_file():
        return folder / WEIGHTS
    candidates = sorted(folder.glob("*.safetensors"))
    return candidates[0] if len(candidates) == 1 else None


class Adapters:
    """The adapters on disk (shared by request threads) and those loaded into the pipeline (the
    worker thread's business)."""

    def __init__(self, lora_dir: Path | None, rescan_seconds: float = 5.0):
        self.lora_dir = lora_dir
        self.rescan_seconds = rescan_seconds
        self._found: dict[str, Path] = {}
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
        with self._lock:
            self._found, self._scanned_at = found, time.monotonic()
        return found

    def names(self) -> list[str]:
        return sorted(self._found)

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
        for name in self.names():
            self.load(pipeline, name)
        if self._loaded:
            pipeline.disable_lora()
        self._active = ()

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
