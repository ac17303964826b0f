"""Control models: the ControlNets, T2I-Adapters and IP-Adapters a request may steer its image with.

    catalog.py     which models ``--control_dir`` offers (listed again when a request names a new one)
    loaded.py      those loaded on the worker, on first use
    ip_adapter.py  IP-Adapters: their image encoder, and their attention processors for one call

How their outputs join a denoiser call is the engine's (``generation/control.py``); how a request
names them, the request's (``request/controls.py``). May import ``errors``, ``metrics``,
``models``, ``request`` and ``adapters`` (the names adapters and control models share); never the
engine, the protocols or the server.
"""

from .catalog import ControlCatalog, ControlModel
from .loaded import LoadedControls

__all__ = ["ControlCatalog", "ControlModel", "LoadedControls"]
