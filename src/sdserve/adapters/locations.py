"""Which store serves ``--lora_dir``: a local folder, S3, or a downloaded snapshot of any other
location KServe's storage code reads."""

from __future__ import annotations

from pathlib import Path

from ..models import storage
from .s3 import S3Store
from .snapshot import SnapshotStore
from .store import LocalStore


def open_store(location: str | Path | None, download_dir: str | Path | None = None):
    """The store for ``--lora_dir``: local folder, S3, or a downloaded snapshot."""
    if location is None or not storage.is_remote(str(location)):
        return LocalStore(Path(location) if location is not None else None)
    location = str(location)
    cache = storage.cache_dir(location, download_dir, kind="loras")
    if location.startswith("s3://"):
        return S3Store(location, cache)
    return SnapshotStore(location, cache)
