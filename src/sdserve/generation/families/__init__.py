"""One module per model family: how it encodes prompts, plans an image's schedule, starts its
latents, calls its denoiser and decodes."""

from __future__ import annotations

from .common import Phase
from .flux import FluxPhase
from .sd import StableDiffusionPhase
from .sd3 import StableDiffusion3Phase
from .sdxl import SDXLBasePhase, SDXLRefinerPhase

BY_FAMILY: dict[str, type[Phase]] = {"sd": StableDiffusionPhase, "sdxl": SDXLBasePhase, "sd3": StableDiffusion3Phase,
                                     "flux": FluxPhase}

__all__ = ["BY_FAMILY", "Phase", "SDXLRefinerPhase"]
