"""Control models loaded on the worker: each on first use, with the base model's device and dtype,
through diffusers' own ``from_pretrained`` (an IP-Adapter as ``ip_adapter.py`` reads it). A loaded
model stays loaded (a remote listing that changed its files loads it again); one whose folder is
gone serves the images already using it."""

from __future__ import annotations

import logging
import time

import torch

from .. import metrics
from .catalog import ControlCatalog
from .ip_adapter import IPAdapter, IPAdapterSets

log = logging.getLogger("sdserve")


class LoadedControls:
    """Owned by the worker thread."""

    def __init__(self, catalog: ControlCatalog, device: torch.device, dtype: torch.dtype, unet=None):
        self.catalog = catalog
        self.device, self.dtype = device, dtype
        self.ip_sets = IPAdapterSets(unet) if unet is not None else None  # IP-Adapters' processors per call
        self._models: dict[str, tuple[object, torch.nn.Module]] = {}  # name -> (listing entry, module)

    def get(self, name: str):
        """The loaded model for ``name`` (loaded now if it is not yet, or its folder changed)."""
        listed = self.catalog.get(name)
        loaded = self._models.get(name)
        if loaded is not None and (listed is None or loaded[0] == listed):
            return loaded[1]
        if listed is None:
            raise KeyError(f"control model {name!r} is not listed in --control_dir")
        from diffusers import ControlNetModel, T2IAdapter

        started = time.perf_counter()
        try:
            if listed.kind == "ip-adapter":
                module = IPAdapter(listed.folder, self.device, self.dtype)
            else:
                cls = ControlNetModel if listed.kind == "controlnet" else T2IAdapter
                module = cls.from_pretrained(listed.folder, torch_dtype=self.dtype, use_safetensors=True)
                module = module.to(self.device).eval().requires_grad_(False)
        except Exception:
            metrics.CONTROL_LOADS.labels(result="error").inc()
            raise
        metrics.CONTROL_LOADS.labels(result="ok").inc()
        log.info("control model %s (%s) loaded in %.1f s", name, listed.kind, time.perf_counter() - started)
        self._models[name] = (listed, module)
        return module
