"""LoRA adapters in S3 (``--lora_dir s3://bucket/prefix/``), each a "folder" ``prefix/<name>/``.

Listing is one paginated ``ListObjectsV2`` of the prefix; an adapter's small ``sdserve.json`` is
downloaded with the listing (it is validated then, like a local one), its weights only when a
request first uses it. Downloads land in the cache under a folder named by the object's size and
ETag, so a replica never reuses a stale copy of an adapter uploaded again under the same name, and
a half-written file is never used (written beside, checked, then renamed).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

from ..models import storage
from ..models.layout import ModelStoreError
from ..request.recipes import MAX_BYTES, RECIPE_FILE
from .store import (
    NAME,
    AdapterFetchError,
    Listed,
    check_safetensors,
    pick_weights,
)

log = logging.getLogger("sdserve")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class S3Store:
    preload = False  # downloaded on first use

    def __init__(self, location: str, cache: Path):
        self.location = location if location.endswith("/") else location + "/"
        self.bucket, self.prefix = storage.split_s3_uri(self.location)
        if self.prefix == "/":
            self.prefix = ""
        self.cache = cache
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = storage.s3_client()
        return self._client

    def list(self) -> tuple[dict[str, Listed], dict[str, str]]:
        """(adapters, skipped folders with the reason); raises ModelStoreError when the bucket
        cannot be listed."""
        files: dict[str, dict[str, dict]] = defaultdict(dict)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    name, sep, file = obj["Key"][len(self.prefix):].partition("/")
                    if sep and file and "/" not in file:  # files in an adapter's folder, not deeper
                        files[name][file] = obj
        except Exception as exc:  # botocore's errors (credentials, endpoint, bucket) all mean "cannot list"
            raise ModelStoreError(f"cannot list LoRA adapters in {self.location}: {exc}") from exc
        found: dict[str, Listed] = {}
        skipped: dict[str, str] = {}
        for name, objects in sorted(files.items()):
            if not NAME.match(name):
                skipped[name] = "names are letters, digits, '.', '_', '-'"
                continue
            weights, reason = pick_weights(list(objects))
            if weights is None:
                skipped[name] = reason
                continue
            recipe_dir = None
            if RECIPE_FILE in objects:
                if objects[RECIPE_FILE]["Size"] > MAX_BYTES:
                    skipped[name] = f"its {RECIPE_FILE} is over {MAX_BYTES // 1024} KiB"
                    continue
                try:
                    recipe_dir = self._download_recipe(name, objects[RECIPE_FILE])
                except (OSError, AdapterFetchError) as exc:
                    skipped[name] = f"its {RECIPE_FILE} could not be downloaded: {exc}"
                    continue
            obj = objects[weights]
            found[name] = Listed(weights, recipe_dir, version=_digest(str(obj["Size"]), obj.get("ETag", "")),
                                 key=obj["Key"], size=obj["Size"])
        return found, skipped

    def _download_recipe(self, name: str, obj: dict) -> Path:
        """A recipe-only local folder for ``read_recipe``; reused while the object is unchanged."""
        folder = self.cache / name / f"recipe-{_digest(str(obj['Size']), obj.get('ETag', ''))}"
        if not (folder / RECIPE_FILE).is_file():
            self._download(obj, folder / RECIPE_FILE)
        return folder

    def fetch(self, name: str, listed: Listed) -> Path:
        """The adapter's weights as a local file, downloaded (and checked) the first time."""
        target = self.cache / name / listed.version / listed.weights
        if target.is_file():
            return target
        self._download({"Key": listed.key, "Size": listed.size}, target, check=True)
        log.info("downloaded LoRA adapter %s (%d bytes) from %s", name, listed.size, self.location)
        return target

    def _download(self, obj: dict, target: Path, check: bool = False) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            try:
                self.client.download_file(self.bucket, obj["Key"], str(partial))
            except Exception as exc:  # network, credentials, a deleted object: all "cannot download"
                raise AdapterFetchError(f"cannot download s3://{self.bucket}/{obj['Key']}: {exc}") from exc
            size = partial.stat().st_size
            if size != obj["Size"]:
                raise AdapterFetchError(f"s3://{self.bucket}/{obj['Key']}: got {size} bytes, the listing said {obj['Size']}")
            if check:
                try:
                    check_safetensors(partial)
                except AdapterFetchError as exc:
                    raise AdapterFetchError(f"s3://{self.bucket}/{obj['Key']}: {exc}") from None
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
