"""What a loaded model supports, and its own defaults: what requests are validated against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCapabilities:
    """What the loaded model supports and its own defaults; filled in by the model store."""

    pipeline_class: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    family: str  # "sd" (1.x/2.x), "sdxl", "sd3" or "flux"
    has_refiner: bool = False
    scheduler_class: str = "EulerDiscreteScheduler"
    size_multiple: int = 8
    has_t5: bool = False  # SD3 with its T5 encoder loaded
    needs_mask: bool = False  # an inpainting model (extra mask channels): every request brings image + mask
    needs_image: bool = False  # an image-to-image model (an SDXL refiner served alone)
    num_train_timesteps: int = 1000  # the scheduler config's: the range of custom timesteps
    transformer_layers: int = 0  # SD3's joint blocks: what skip_guidance_layers may name
    guidance_embedded: bool = False  # FLUX.1 [dev]: the guidance scale is a transformer input ([schnell]: none)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def scheduler_family(self) -> str:
        return "flow" if self.family in ("sd3", "flux") else "diffusion"
