"""Remote model locations (``s3://``, ``gs://``, ``hf://``, ``https://`` ...) for ``--model_dir`` and
``--refiner_dir``, downloaded once into a writable cache with KServe's own storage code (the
storage initializer's ``kserve_storage``), so the same credentials settings apply: ``AWS_*``
variables or the ``STORAGE_CONFIG`` JSON of a ``storage-config`` secret.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from .layout import ModelStoreError

log = logging.getLogger("sdserve")

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_COMPLETE = ".sdserve-download-complete"


def is_remote(location: str) -> bool:
    return bool(_URI.match(location))


def default_download_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sdserve" / "models"


def data_connection_env() -> None:
    """OpenShift AI data connections name the endpoint AWS_S3_ENDPOINT; KServe's code reads
    AWS_ENDPOINT_URL."""
    if os.environ.get("AWS_S3_ENDPOINT") and not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_S3_ENDPOINT"]


def cache_dir(location: str, download_dir: str | Path | None = None, kind: str = "") -> Path:
    """The folder under the download cache that holds ``location``'s copy: readable and unique
    (the location's tail and a hash of all of it); ``kind`` is a sub-folder (``loras``)."""
    root = Path(download_dir) if download_dir else default_download_dir()
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", location.split("://", 1)[1]).strip("-")[-60:]
    return (root / kind if kind else root) / f"{tail}-{hashlib.sha256(location.encode()).hexdigest()[:12]}"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` as (bucket, ``some/prefix``)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri} is not an s3:// location")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri} names no bucket")
    return bucket, key


def s3_client():
    """A boto3 S3 client configured as KServe's storage code configures its own: ``AWS_*``
    variables (``AWS_S3_ENDPOINT`` of a data connection too), ``STORAGE_CONFIG``, CA bundles,
    timeouts and retries."""
    try:
        import boto3
        from kserve_storage import Storage
    except ImportError:
        raise ModelStoreError("s3:// locations need the storage support: pip install 'sdserve[storage]'") from None
    data_connection_env()
    Storage._update_with_storage_spec()  # STORAGE_CONFIG (a storage-config secret) into AWS_* variables
    return boto3.client("s3", **Storage._get_s3_client_kwargs())


def local_path(location: str, download_dir: str | Path | None = None) -> str:
    """``location`` itself when it is a local path; otherwise download it (once) and return the
    local copy."""
    if not is_remote(location):
        return location
    try:
        from kserve_storage import Storage
    except ImportError:
        raise ModelStoreError(
            f"{location} is remote and the storage support is not installed: pip install 'sdserve[storage]'"
        ) from None
    data_connection_env()
    target = cache_dir(location, download_dir)
    if (target / _COMPLETE).is_file():
        log.info("using %s, downloaded earlier to %s", location, target)
        return str(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log.info("downloading %s to %s", location, target)
    try:
        Storage.download(location, str(partial))
    except Exception as exc:  # noqa: BLE001 - storage backends raise anything; report it as start-up failure
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelStoreError(f"cannot download {location}: {exc}") from exc
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    (target / _COMPLETE).touch()
    return str(target)
