"""Fewer denoiser FLOPs per image, per request or as the server's default:

* ``guidance_interval`` [lo, hi]: classifier-free guidance only while the image is between those
  fractions of its schedule (Kynkäänniemi et al., 2024); outside it the image runs one row instead of
  two. ``[0, f]`` is diffusers' "dynamic CFG" (guidance off after a fraction of the steps).
* ``cache``: reuse deep features between steps. ``deep`` (UNet models, DeepCache): the blocks
  below the shallowest run every ``cache_interval``-th step only, the others reuse their output;
  ``first_block`` (transformer models, First Block Cache): when the first block's residual changed
  by less than ``cache_threshold`` (relative) since the last full step, the other blocks are skipped
  and their last residual reused.

Checked here against the model and each other; ``generation/`` does the saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kserve.errors import InvalidInput

CACHES = ("none", "deep", "first_block")
CACHE_FAMILIES = {"deep": ("sd", "sdxl"), "first_block": ("sd3", "flux")}  # UNet models; transformer models
CACHE_MODELS = {"deep": "UNet models (SD 1.x/2.x, SDXL)", "first_block": "transformer models (SD3, SD3.5, FLUX.1)"}
FULL_SCHEDULE = (0.0, 1.0)


@dataclass(frozen=True)
class SavingsDefaults:
    """The server's defaults (--guidance_interval, --cache, --cache_interval, --cache_threshold)."""

    guidance_interval: tuple[float, float] = FULL_SCHEDULE
    cache: str = "none"
    cache_interval: int = 3
    cache_threshold: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.guidance_interval
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"guidance_interval must be two fractions lo < hi from 0 to 1, got {lo},{hi}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if not 1 <= self.cache_interval <= 10:
            raise ValueError(f"cache_interval must be from 1 to 10, got {self.cache_interval}")
        if not 0 < self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in (0, 1], got {self.cache_threshold}")


def parse_interval(text: str) -> tuple[float, float]:
    """``--guidance_interval 0.2,0.8`` -> (0.2, 0.8); raises ValueError."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance_interval is LO,HI (fractions of the schedule), got {text!r}") from None
    return lo, hi


def resolve(v: Any, family: str, defaults: SavingsDefaults) -> dict[str, Any]:
    """The request's savings fields, its own or the server's; raises InvalidInput naming the field.
    ``v`` is validation's view of the fields (``has``, ``label`` and the values)."""
    interval = tuple(v.guidance_interval) if v.has("guidance_interval") else defaults.guidance_interval
    if not interval[0] < interval[1]:
        raise InvalidInput(f"{v.label('guidance_interval')}: [lo, hi] with lo < hi, fractions of the schedule from "
                           f"0 to 1 (the default [0, 1] guides every step), got {list(interval)}")
    cache = v.cache if v.has("cache") else defaults.cache
    if cache != "none" and family not in CACHE_FAMILIES[cache]:
        if v.has("cache"):
            other = next((c for c, families in CACHE_FAMILIES.items() if family in families), None)
            raise InvalidInput(f"{v.label('cache')}: {cache} is for {CACHE_MODELS[cache]}; "
                               f"this model takes cache {other or 'none'}")
        cache = "none"  # the server's default is for the other kind of model
    for name, mode in (("cache_interval", "deep"), ("cache_threshold", "first_block")):
        if v.has(name) and cache != mode:
            raise InvalidInput(f"{v.label(name)}: applies to cache {mode}; this request's cache is {cache}")
    return {"guidance_interval": (float(interval[0]), float(interval[1])), "cache": cache,
            "cache_interval": v.cache_interval if v.has("cache_interval") else defaults.cache_interval,
            "cache_threshold": v.cache_threshold if v.has("cache_threshold") else defaults.cache_threshold}
