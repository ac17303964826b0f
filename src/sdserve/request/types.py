"""The one request type every protocol converts into (validated by ``validation.py``), the result
it gets back, and the bounds and model capabilities validation works against."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

MAX_SEED = 2**63 - 1
IMAGE_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}


class RefinerMode(StrEnum):
    NONE = "none"  # base model only
    ENSEMBLE = "ensemble"  # expert ensemble: base denoises the first high_noise_frac, refiner the rest
    REFINE = "refine"  # base finishes, refiner runs img2img over its latents (refiner_strength)


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on what one request may ask for."""

    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    max_steps: int = 100
    max_images: int = 8
    max_prompt_length: int = 2000
    max_prompt_tokens: int = 300  # weighted syntaxes read every token (in 75-token chunks): at most this many
    min_side: int = 64
    max_guidance_scale: float = 30.0
    max_input_pixels: int = 4 * 2048 * 2048  # an input image's size, read from its header
    max_controls: int = 4  # control inputs (ControlNet, T2I-Adapter) in one request

    def __post_init__(self) -> None:
        for name in ("max_side", "max_pixels", "max_steps", "max_images", "max_prompt_length", "max_input_pixels",
                     "max_prompt_tokens", "max_controls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side must be at least {self.min_side}, got {self.max_side}")


@dataclass(frozen=True)
class Control:
    """One control input: a ControlNet or T2I-Adapter of the server, its image (after the
    preprocessor; the engine resizes it as the pipelines do), its scale and the fraction of the
    steps it applies over."""

    model: str
    kind: str  # controlnet | t2i-adapter | ip-adapter
    image: Any = field(compare=False, repr=False)  # PIL RGB; an IP-Adapter's: a list of them too
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """A validated, fully resolved text-to-image request (no field left to a default)."""

    prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    prompt_3: str | None = None
    negative_prompt_3: str | None = None
    # SD3's skip-layer guidance: the text row again without these layers, between start and stop
    skip_guidance_layers: tuple[int, ...] | None = None
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    prompt_syntax: str = "plain"  # plain | compel | a1111 (prompt_syntax.py)
    true_cfg_scale: float = 1.0  # FLUX: classifier-free guidance with the negative prompt above 1
    num_images: int = 1
    scheduler: str | None = None  # canonical name from schedulers.SCHEDULERS; None: the model's own
    # Sampler settings; None: the model's own (eta: the pipelines' 0.0, where the sampler takes it).
    eta: float | None = None
    timestep_spacing: str | None = None
    timesteps: tuple[int, ...] | None = None  # the schedule outright; num_inference_steps is its length
    refiner: RefinerMode = RefinerMode.NONE
    high_noise_frac: float = 0.8
    refiner_strength: float = 0.3
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    image_format: str = "png"
    quality: int = 90
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # step_savings.py: guidance only within it
    cache: str = "none"  # none | deep | first_block
    cache_interval: int = 3
    cache_threshold: float = 0.1
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale), applied to the base model
    # Image input: ``image`` (RGB) and ``mask`` (grayscale, white = repaint) are PIL images at
    # width x height; ``strength`` is how much of the schedule runs from the noised image.
    image: Any = field(default=None, compare=False, repr=False)
    mask: Any = field(default=None, compare=False, repr=False)
    strength: float | None = None
    controls: tuple[Control, ...] = ()  # ControlNet / T2I-Adapter inputs, on the base model

    @property
    def seeds(self) -> list[int]:
        """One seed per image: image i uses seed + i, so each image can be reproduced alone."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def negative(self, encoder: int) -> str:
        """Negative prompt for text encoder ``encoder`` (1-3): its own, else the first, else ""."""
        own = {1: self.negative_prompt, 2: self.negative_prompt_2, 3: self.negative_prompt_3}[encoder]
        return own or self.negative_prompt or ""

    def image_parameters(self, seed: int, model: str) -> dict[str, Any]:
        """What reproduces one image of this request alone (stored in its PNG)."""
        out = self.describe()
        for name in ("format", "quality"):
            out.pop(name, None)
        return {**out, "seed": seed, "num_images": 1, "model": model}

    def describe(self) -> dict[str, Any]:
        """The resolved parameters, as returned to clients so an image can be reproduced."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "mask")}
        out["refiner"] = str(self.refiner)
        out["format"] = out.pop("image_format")
        out["loras"] = [{"name": name, "scale": scale} for name, scale in self.loras] or None
        out["controls"] = [{"model": c.model, "kind": c.kind, "scale": c.scale, "start": c.start, "end": c.end}
                           for c in self.controls] or None  # the images are the client's
        if self.image is not None:  # the image itself is the client's; say what was done with it
            out["mode"] = "inpaint" if self.mask is not None else "img2img"
        if self.true_cfg_scale == 1.0:  # FLUX's, off: out, as other families refuse the field
            out.pop("true_cfg_scale")
        if self.skip_guidance_layers is None:
            for name in ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"):
                out.pop(name)
        if self.cache != "deep":  # the settings of a cache the request does not use stay out
            out.pop("cache_interval")
        if self.cache != "first_block":
            out.pop("cache_threshold")
        for name in ("original_size", "crops_coords_top_left", "target_size", "timesteps", "guidance_interval",
                     "skip_guidance_layers"):
            if out[name] is not None:
                out[name] = list(out[name])
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class GenerationResult:
    """Images (uint8 arrays, H x W x 3) and the seed of each, plus where the time went."""

    images: list  # list[numpy.ndarray]
    seeds: list[int]
    queue_seconds: float = 0.0
    generate_seconds: float = 0.0
    batch_images: int = 0
    rows_saved: dict[str, int] | None = None  # denoiser rows saved (guidance_interval, cache), when asked for
