"""LoRA adapters: where they come from, which are loaded, and how they join a denoiser call.

    store.py      what every store shares (names, weights files, checks) and the local folder store
    s3.py         ``--lora_dir s3://...``: listed with one ListObjectsV2, downloaded on first use
    snapshot.py   other remote locations: downloaded whole at each listing
    locations.py  which store serves ``--lora_dir``
    library.py    Adapters: the listing, recipes and fetching (request threads)
    resident.py   those loaded into the pipeline: on first use, within --max_loaded_adapters (worker)
    batched.py    each row's adapters in one denoiser call (per-row low-rank deltas)

May import ``errors``, ``metrics``, ``models`` and ``request`` (recipes are validated like
requests); never the engine, the protocols or the server.
"""

from .library import Adapters, parse_fuse_lora
from .locations import open_store
from .store import NAME, AdapterFetchError

__all__ = ["NAME", "AdapterFetchError", "Adapters", "open_store", "parse_fuse_lora"]
