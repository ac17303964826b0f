"""Adapters in a remote location with no cheap listing (``gs://``, ``hf://``, ``https://``, ...):
each listing downloads all of it with KServe's storage code and serves the copy as a local folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..models import storage
from ..models.layout import ModelStoreError
from .store import Listed, LocalStore


class SnapshotStore(LocalStore):
    """A remote location with no cheap listing: each listing downloads all of it (KServe's
    storage code) into a fresh snapshot, served as a local folder; the previous snapshot is kept
    for adapters fetched from it."""

    preload = False

    def __init__(self, location: str, cache: Path):
        super().__init__(None)
        self.location = location
        self.cache = cache
        self._snapshots: list[Path] = []

    def list(self) -> tuple[dict[str, Listed], dict[str, str]]:
        try:
            from kserve_storage import Storage
        except ImportError:
            raise ModelStoreError(f"--lora_dir {self.location} is remote and the storage support is not installed: "
                                  "pip install 'sdserve[storage]'") from None
        storage.data_connection_env()
        self.cache.mkdir(parents=True, exist_ok=True)
        snapshot = Path(tempfile.mkdtemp(prefix="snapshot-", dir=self.cache))
        try:
            Storage.download(self.location, str(snapshot))
        except Exception as exc:  # storage backends raise anything
            shutil.rmtree(snapshot, ignore_errors=True)
            raise ModelStoreError(f"cannot download {self.location}: {exc}") from exc
        self._snapshots.append(snapshot)
        for old in self._snapshots[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        self._snapshots = self._snapshots[-2:]
        self.root = snapshot
        return super().list()
