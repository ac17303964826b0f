"""Where LoRA adapters come from: ``--lora_dir``, a local folder or a remote location.

A store lists its adapters (name -> :class:`Listed`) and fetches one adapter's weights to a local
file when it is first used. This module holds what every store shares and :class:`LocalStore`, a
folder (a mounted volume too), one sub-folder per adapter, nothing to fetch; ``s3.py`` and
``snapshot.py`` hold the remote ones and ``locations.py`` picks one for ``--lora_dir``.

A store never joins a request's text into a path: names come from the listing, and only names
that pass :data:`NAME` are listed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..models.layout import PICKLE_SUFFIXES

log = logging.getLogger("sdserve")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' LoRA training saves


class AdapterFetchError(RuntimeError):
    """An adapter's weights could not be fetched, or are not a readable safetensors file."""


@dataclass(frozen=True)
class Listed:
    """One adapter as listed: enough to show it and to fetch it later."""

    weights: str  # the weights file's name in the adapter's folder
    recipe_dir: Path | None  # a local folder holding its sdserve.json; None when it has none
    version: str = ""  # what identifies this upload in a remote store (size and ETag), for the cache
    key: str = ""  # the weights' object key in a remote store
    size: int = 0  # and their size in bytes, as listed


def pick_weights(files: list[str]) -> tuple[str | None, str]:
    """The weights among an adapter folder's file names: the diffusers name, else the only
    ``.safetensors``; with the reason when there is none."""
    if WEIGHTS in files:
        return WEIGHTS, ""
    candidates = sorted(f for f in files if f.endswith(".safetensors"))
    if len(candidates) == 1:
        return candidates[0], ""
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        return None, f"pickle weights are refused ({', '.join(pickles)})"
    return None, "no single .safetensors file" if not candidates else f"several .safetensors files and none named {WEIGHTS}"


def check_safetensors(path: Path) -> None:
    """Raise AdapterFetchError unless ``path`` is a safetensors file with tensors in it (its
    header is read, not the tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise AdapterFetchError("the safetensors file holds no tensors")
    except AdapterFetchError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a bad header
        raise AdapterFetchError(f"not a readable safetensors file ({exc})") from None


class LocalStore:
    """A local folder of adapter folders; every adapter is loaded at start-up."""

    preload = True

    def __init__(self, root: Path | None):
        self.root = root
        self.location = str(root)

    def list(self) -> tuple[dict[str, Listed], dict[str, str]]:
        """(adapters, skipped folders with the reason)."""
        found: dict[str, Listed] = {}
        skipped: dict[str, str] = {}
        if self.root is None or not self.root.is_dir():
            return found, skipped
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not NAME.match(folder.name):
                skipped[folder.name] = "names are letters, digits, '.', '_', '-'"
                continue
            weights, reason = pick_weights([f.name for f in folder.iterdir() if f.is_file()])
            if weights is None:
                skipped[folder.name] = reason
            else:
                found[folder.name] = Listed(weights, folder)
        return found, skipped

    def fetch(self, name: str, listed: Listed) -> Path:
        return listed.recipe_dir / listed.weights
