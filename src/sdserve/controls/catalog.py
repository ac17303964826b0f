"""Which control models ``--control_dir`` offers: one folder per model, each a diffusers
``ControlNetModel`` or ``T2IAdapter`` (``config.json`` and safetensors weights) or an IP-Adapter
(``image_encoder/`` and ``ip-adapter*.safetensors``, as diffusers' ``load_ip_adapter`` reads them).

The folder is a local path (a mounted volume too) or a remote location KServe's storage code reads
(``s3://``, ``gs://``, ...), downloaded whole at each listing. A request naming a model not yet
listed lists again, at most once every ``relist_seconds``, so a new folder is served without a
restart. A model is listed only when it fits the served denoiser (its cross-attention width and
blocks); the others are logged with the reason. Request names are only compared with the names
listed, never joined into a path.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import metrics
from ..adapters.store import NAME
from ..models import storage
from ..models.layout import PICKLE_SUFFIXES, ModelStoreError
from ..request.controls import CONTROL_CLASSES
from .ip_adapter import IMAGE_ENCODER, weights_file

log = logging.getLogger("sdserve")


@dataclass(frozen=True)
class ControlModel:
    """One listed control model."""

    name: str
    kind: str  # controlnet | t2i-adapter | ip-adapter
    folder: Path


def fits(kind: str, config: dict[str, Any], unet: dict[str, Any]) -> str:
    """Why a control model's config does not fit the served UNet's, or "" when it does."""
    if kind == "controlnet":
        for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type"):
            mine, theirs = config.get(key), unet.get(key)
            if (list(mine) if isinstance(mine, (list, tuple)) else mine) != \
                    (list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
                return f"{key} {mine} differs from the model's {theirs}"
        return ""
    channels = config.get("channels") or []
    if not channels or channels[0] != unet["block_out_channels"][0]:
        return f"channels {channels} do not start with the model's {unet['block_out_channels'][0]}"
    return ""


def ip_adapter_fits(folder: Path, unet: dict[str, Any]) -> str:
    """Why an IP-Adapter folder cannot be served with this UNet, or "" when it can."""
    from safetensors import safe_open

    name = weights_file(folder)
    if name is None:
        return "an image_encoder/ folder but not one ip-adapter*.safetensors"
    try:
        with safe_open(str(folder / name), framework="pt") as f:
            keys = set(f.keys())
            first = f.get_slice("ip_adapter.1.to_k_ip.weight").get_shape() if "ip_adapter.1.to_k_ip.weight" in keys \
                else None
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a bad header
        return f"{name} is not a readable safetensors file ({exc})"
    if not ({"image_proj.proj.weight", "image_proj.latents", "image_proj.proj.3.weight"} & keys):
        return f"{name} is not a plain, Plus or Full Face IP-Adapter (FaceID needs face embeddings: not served)"
    layers = sum(1 for k in keys if k.endswith(".to_k_ip.weight"))
    if first is None or first[1] != unet["cross_attention_dim"] or layers != unet["cross_attention_layers"]:
        return (f"its {layers} cross-attention layers of width {first[1] if first else '?'} do not match the "
                f"model's {unet['cross_attention_layers']} of width {unet['cross_attention_dim']}")
    return ""


def read_folder(folder: Path, unet: dict[str, Any]) -> tuple[str | None, str]:
    """(kind, "") for a servable control model folder, else (None, why not)."""
    if (folder / IMAGE_ENCODER).is_dir() and not (folder / "config.json").is_file():
        why = ip_adapter_fits(folder, unet)
        return ("ip-adapter", "") if not why else (None, why)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None, ("no config.json (a diffusers ControlNetModel or T2IAdapter folder) nor image_encoder/ "
                      "(an IP-Adapter)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        return None, f"config.json is not JSON ({exc})"
    kind = CONTROL_CLASSES.get(config.get("_class_name"))
    if kind is None:
        return None, f"a {config.get('_class_name')!r}, not one of {', '.join(CONTROL_CLASSES)}"
    files = [f.name for f in folder.iterdir() if f.is_file()]
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        return None, f"pickle weights are refused ({', '.join(pickles)})" if pickles else "no .safetensors weights"
    why = fits(kind, config, unet)
    return (kind, "") if not why else (None, f"does not fit the served model: {why}")


class ControlCatalog:
    """The listing, shared by request threads (lookups) and the worker (loading)."""

    def __init__(self, location: str | Path | None, unet, relist_seconds: float = 10.0,
                 download_dir: str | Path | None = None, required: bool = False):
        self.location = str(location) if location is not None else None
        # what a control model must fit: the served UNet's config and its cross-attention layers
        self.unet = {**unet.config, "cross_attention_layers": sum(
            1 for name in unet.attn_processors if not name.endswith("attn1.processor"))}
        self.relist_seconds = relist_seconds
        self.download_dir = download_dir
        self._models: dict[str, ControlModel] = {}
        self._listed_at = -float("inf")
        self._lock = threading.Lock()
        self._snapshot: Path | None = None
        if required and self.location is not None and not storage.is_remote(self.location) \
                and not Path(self.location).is_dir():
            raise ModelStoreError(f"--control_dir {self.location}: no such folder")
        self.relist()

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str) -> ControlModel | None:
        return self._models.get(name)

    def kind(self, name: str) -> str | None:
        """A model's kind; an unknown name lists the folder again (rate-limited) first."""
        if name not in self._models and NAME.match(name) \
                and time.monotonic() - self._listed_at >= self.relist_seconds:
            self.relist()
        model = self._models.get(name)
        return model.kind if model is not None else None

    def relist(self) -> None:
        with self._lock:
            self._listed_at = time.monotonic()
            try:
                root = self._root()
            except Exception as exc:  # noqa: BLE001 - storage backends raise anything; keep the last listing
                metrics.CONTROL_LISTINGS.labels(result="error").inc()
                log.warning("--control_dir %s: listing failed (%s); serving the last listing", self.location, exc)
                return
            found: dict[str, ControlModel] = {}
            for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root is not None else []:
                kind, why = read_folder(folder, self.unet) if NAME.match(folder.name) else \
                    (None, "names are letters, digits, '.', '_', '-'")
                if kind is None:
                    log.warning("control model folder %s skipped: %s", folder.name, why)
                    continue
                found[folder.name] = ControlModel(folder.name, kind, folder)
            added = sorted(set(found) - set(self._models))
            self._models = found
            metrics.CONTROL_LISTINGS.labels(result="ok").inc()
            if added:
                log.info("control models found: %s", ", ".join(f"{n} ({found[n].kind})" for n in added))

    def _root(self) -> Path | None:
        """The local folder to list: the folder itself, or a fresh download of a remote one."""
        if self.location is None:
            return None
        if not storage.is_remote(self.location):
            root = Path(self.location)
            return root if root.is_dir() else None
        storage.data_connection_env()
        cache = storage.cache_dir(self.location, self.download_dir, kind="controls")
        cache.mkdir(parents=True, exist_ok=True)
        snapshot = Path(tempfile.mkdtemp(prefix="snapshot-", dir=cache))
        try:
            if self.location.startswith("s3://"):
                _download_s3(self.location, snapshot)
            else:
                from kserve_storage import Storage

                Storage.download(self.location, str(snapshot))
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        # Models already loaded keep their weights in memory; the previous snapshot can go.
        if self._snapshot is not None:
            shutil.rmtree(self._snapshot, ignore_errors=True)
        self._snapshot = snapshot
        return snapshot


def _download_s3(location: str, target: Path) -> None:
    """An ``s3://`` prefix copied into ``target`` with boto3, in this thread: a relisting runs on a
    request thread of a server with gRPC threads, where the storage code's worker processes
    (forked) could hang."""
    bucket, prefix = storage.split_s3_uri(location)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = storage.s3_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = Path(obj["Key"][len(prefix):])
            if not relative.parts or ".." in relative.parts or obj["Key"].endswith("/"):
                continue
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target / relative))
