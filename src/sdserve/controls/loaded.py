"""Control models loaded on the worker: each on first use, with the base model's device and dtype,
through diffusers' own ``from_pretrained`` (an IP-Adapter as ``ip_adapter.py`` reads it). At most
``max_loaded`` stay loaded, the least recently used going first: a model in flight is used at every
step, so it goes only when more than that many are in flight, and is loaded again at its next step
(the same weights: the same image). A remote listing that changed a model's files loads it again;
one whose folder is gone serves the images already using it."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

from .. import metrics
from .catalog import ControlCatalog
from .ip_adapter import IPAdapter, IPAdapterSets

log = logging.getLogger("sdserve")


class LoadedControls:
    """Owned by the worker thread."""

    def __init__(self, catalog: ControlCatalog, device: torch.device, dtype: torch.dtype, unet=None,
                 max_loaded: int = 8):
        if max_loaded < 1:
            raise ValueError(f"max_loaded_controls must be at least 1, got {max_loaded}")
        self.catalog = catalog
        self.device, self.dtype = device, dtype
        self.max_loaded = max_loaded
        self.ip_sets = IPAdapterSets(unet) if unet is not None else None  # IP-Adapters' processors per call
        self._models: OrderedDict[str, tuple[object, object]] = OrderedDict()  # name -> (listing, model), LRU first

    def get(self, name: str):
        """The loaded model for ``name`` (loaded now if it is not yet, or its folder changed)."""
        listed = self.catalog.get(name)
        loaded = self._models.get(name)
        if loaded is not None and (listed is None or loaded[0] == listed):
            self._models.move_to_end(name)
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
        self._models.move_to_end(name)
        while len(self._models) > self.max_loaded:
            gone, _ = self._models.popitem(last=False)
            metrics.CONTROL_EVICTIONS.inc()
            log.info("control model %s unloaded (--max_loaded_controls %d)", gone, self.max_loaded)
        return module
