"""The one request type every protocol converts into, and the one place it is validated.

Protocol adapters (v1, v2 REST/gRPC) turn their payloads into a plain mapping of generation
parameters and call :meth:`RequestParser.parse`. Every error names the offending field and the
allowed values or range, and is raised as ``kserve.errors.InvalidInput`` (HTTP 400, gRPC
INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol

from kserve.errors import InvalidInput

from .schedulers import min_steps, resolve_scheduler_name

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
    min_side: int = 64
    max_guidance_scale: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_side", "max_pixels", "max_steps", "max_images", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side must be at least {self.min_side}, got {self.max_side}")


@dataclass(frozen=True)
class ModelCapabilities:
    """What the loaded model supports and its own defaults; filled in by the model store."""

    pipeline_class: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    family: str  # "sd" (1.x/2.x), "sdxl" or "sd3"
    has_refiner: bool = False
    scheduler_class: str = "EulerDiscreteScheduler"
    size_multiple: int = 8
    has_t5: bool = False  # SD3 with its T5 encoder loaded

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def scheduler_family(self) -> str:
        return "flow" if self.family == "sd3" else "diffusion"


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
    num_images: int = 1
    scheduler: str | None = None  # canonical name from schedulers.SCHEDULERS; None: the model's own
    refiner: RefinerMode = RefinerMode.NONE
    high_noise_frac: float = 0.8
    refiner_strength: float = 0.3
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    image_format: str = "png"
    quality: int = 90
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale), applied to the base model

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
        out = asdict(self)
        out["refiner"] = str(self.refiner)
        out["format"] = out.pop("image_format")
        out["loras"] = [{"name": name, "scale": scale} for name, scale in self.loras] or None
        for name in ("original_size", "crops_coords_top_left", "target_size"):
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


# Every accepted field, with a short description (used in error messages and docs).
FIELDS: dict[str, str] = {
    "prompt": "text to generate from (required)",
    "negative_prompt": "what to keep out of the image",
    "prompt_2": "SDXL/SD3: prompt for the second text encoder (default: prompt)",
    "negative_prompt_2": "SDXL/SD3: negative prompt for the second text encoder",
    "prompt_3": "SD3: prompt for the T5 encoder (default: prompt)",
    "negative_prompt_3": "SD3: negative prompt for the T5 encoder",
    "width": "image width in pixels, a multiple of 8",
    "height": "image height in pixels, a multiple of 8",
    "num_inference_steps": "denoising steps",
    "guidance_scale": "classifier-free guidance scale",
    "seed": "random seed (0 .. 2^63-1; -1 or absent: random); image i uses seed + i",
    "num_images": "images to generate for this prompt",
    "scheduler": "sampler name",
    "refiner": "none | ensemble | refine",
    "high_noise_frac": "ensemble split: fraction of denoising done by the base model",
    "refiner_strength": "refine mode: how much of the schedule the refiner re-runs",
    "original_size": "SDXL micro-conditioning [width, height]",
    "crops_coords_top_left": "SDXL micro-conditioning [top, left]",
    "target_size": "SDXL micro-conditioning [width, height]",
    "format": "png | jpeg | webp",
    "quality": "jpeg/webp quality 1..100",
    "loras": 'LoRA adapters: [{"name": "...", "scale": 0.8}, ...] or ["name", ...]',
}
ALIASES: dict[str, str] = {
    "denoising_limit": "high_noise_frac",
    "num_images_per_prompt": "num_images",
    "output_image_format": "format",
}
# Fields only some model families read; the others would silently ignore them, so they are refused.
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_2": ("sdxl", "sd3"),
    "negative_prompt_2": ("sdxl", "sd3"),
    "prompt_3": ("sd3",),
    "negative_prompt_3": ("sd3",),
    "original_size": ("sdxl",),
    "crops_coords_top_left": ("sdxl",),
    "target_size": ("sdxl",),
}
MAX_LORAS = 8
LORA_SCALE = 2.0  # scales from -2 to 2


class AdapterCatalog(Protocol):
    """The LoRA adapters a request may name (names are looked up, never used as paths)."""

    def exists(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...


class NoAdapters:
    def exists(self, name: str) -> bool:
        return False

    def names(self) -> list[str]:
        return []


class RequestParser:
    """Turns a mapping of parameters into a :class:`GenerationRequest`, or raises InvalidInput."""

    def __init__(self, limits: Limits, model: ModelCapabilities, adapters: AdapterCatalog | None = None):
        self.limits = limits
        self.model = model
        self.adapters = adapters or NoAdapters()

    def check_total_images(self, requests: list[GenerationRequest], field: str) -> None:
        """One HTTP/gRPC request may carry several prompts; together they get --max_images."""
        total = sum(r.num_images for r in requests)
        if total > self.limits.max_images:
            raise InvalidInput(
                f"{field}: {total} images asked for in one request; the server limit is {self.limits.max_images}"
            )

    def check_fields(self, values: Mapping[str, Any], where: str = "") -> None:
        """Reject unknown field names in a partial set of parameters (e.g. shared defaults)."""
        _Fields(values, where)

    def parse(self, values: Mapping[str, Any], where: str = "") -> GenerationRequest:
        """Validate ``values``; ``where`` prefixes field names in errors (e.g. ``instances[2].``)."""
        if not isinstance(values, Mapping):
            raise InvalidInput(f"{where or 'request'}: expected an object of generation parameters")
        v = _Fields(values, where)
        lim, model = self.limits, self.model
        for name, families in FAMILY_FIELDS.items():
            if v.has(name) and model.family not in families:
                names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3"}
                raise InvalidInput(
                    f"{v.label(name)}: only {' and '.join(names[f] for f in families)} models accept this "
                    f"field; the loaded model is a {model.pipeline_class}"
                )
        if model.family == "sd3" and not model.has_t5:
            for name in ("prompt_3", "negative_prompt_3"):
                if v.has(name):
                    raise InvalidInput(f"{v.label(name)}: the T5 encoder is not loaded (--drop_t5), so it would have no effect")

        default_width, default_height = _default_size(model, lim)
        width = v.dimension("width", default_width, lim, model.size_multiple)
        height = v.dimension("height", default_height, lim, model.size_multiple)
        if width * height > lim.max_pixels:
            raise InvalidInput(
                f"{where}width x height: {width}x{height} = {width * height} pixels exceeds the "
                f"server limit of {lim.max_pixels} pixels"
            )
        steps = v.integer("num_inference_steps", min(model.default_steps, lim.max_steps), 1, lim.max_steps)
        refiner = v.refiner_mode(model.has_refiner)
        high_noise_frac = v.number("high_noise_frac", 0.8, 0.0, 1.0, open_range=True)
        refiner_strength = v.number("refiner_strength", 0.3, 0.0, 1.0, open_low=True)
        if refiner is RefinerMode.REFINE and int(steps * refiner_strength) < 1:
            raise InvalidInput(
                f"{v.label('refiner_strength')}: {refiner_strength} of {steps} steps leaves the refiner no "
                f"step; raise refiner_strength or num_inference_steps"
            )
        scheduler = v.scheduler(model.scheduler_family)
        fewest = min_steps(scheduler, model.scheduler_class, model.scheduler_family)
        if steps < fewest:
            raise InvalidInput(
                f"{v.label('num_inference_steps')}: the {scheduler or model.scheduler_class} scheduler "
                f"needs at least {fewest} steps, got {steps}"
            )
        if refiner is RefinerMode.ENSEMBLE and steps < 2:
            raise InvalidInput(
                f"{v.label('num_inference_steps')}: the ensemble refiner mode needs at least 2 steps, got {steps}"
            )
        negative_prompt = v.text("negative_prompt", lim.max_prompt_length)
        negative_prompt_2 = v.text("negative_prompt_2", lim.max_prompt_length)
        negative_prompt_3 = v.text("negative_prompt_3", lim.max_prompt_length)
        if negative_prompt is None and (negative_prompt_2 is not None or negative_prompt_3 is not None):
            # diffusers ignores the other negative prompts when negative_prompt is absent; make them count.
            negative_prompt = ""
        seed = v.integer("seed", -1, -1, MAX_SEED)
        image_format = v.choice("format", "png", IMAGE_FORMATS)
        return GenerationRequest(
            prompt=v.text("prompt", lim.max_prompt_length, required=True),
            prompt_2=v.text("prompt_2", lim.max_prompt_length),
            prompt_3=v.text("prompt_3", lim.max_prompt_length),
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=v.number("guidance_scale", model.default_guidance_scale, 0.0, lim.max_guidance_scale),
            seed=secrets.randbits(63) if seed == -1 else seed,
            num_images=v.integer("num_images", 1, 1, lim.max_images),
            scheduler=scheduler,
            refiner=refiner,
            high_noise_frac=high_noise_frac,
            refiner_strength=refiner_strength,
            original_size=v.pair("original_size", 1, 16384),
            crops_coords_top_left=v.pair("crops_coords_top_left", 0, 16384),
            target_size=v.pair("target_size", 1, 16384),
            image_format=image_format,
            quality=v.integer("quality", 90, 1, 100),
            loras=v.loras(self.adapters),
        )


class _Fields:
    """Typed access to one request's raw values; each accessor raises with the field's name."""

    def __init__(self, values: Mapping[str, Any], where: str):
        self.where = where
        self.values: dict[str, Any] = {}
        self.given_as: dict[str, str] = {}  # canonical name -> the key the client used
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if name not in FIELDS:
                raise InvalidInput(
                    f"{where}{key}: unknown field; allowed fields: {', '.join(sorted(FIELDS))} "
                    f"(aliases: {', '.join(f'{a}={n}' for a, n in sorted(ALIASES.items()))})"
                )
            if name in self.values:
                raise InvalidInput(f"{where}{key}: given twice (as {name} and an alias)")
            self.values[name] = value
            self.given_as[name] = key

    def label(self, name: str) -> str:
        return f"{self.where}{self.given_as.get(name, name)}"

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None

    def _fail(self, name: str, expected: str) -> InvalidInput:
        return InvalidInput(f"{self.label(name)}: must be {expected}, got {self.values[name]!r:.200}")

    def text(self, name: str, max_length: int, required: bool = False) -> str | None:
        value = self.values.get(name)
        if value is None:
            if required:
                raise InvalidInput(f"{self.label(name)}: required field is missing")
            return None
        if not isinstance(value, str):
            raise self._fail(name, "a string")
        if len(value) > max_length:
            raise InvalidInput(
                f"{self.label(name)}: {len(value)} characters is over the limit of {max_length}"
            )
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.values.get(name)
        if value is None:
            return default
        number = _as_number(value)
        if number is None or number != int(number) or not lo <= number <= hi:
            raise self._fail(name, f"an integer from {lo} to {hi}")
        return int(number)

    def number(
        self,
        name: str,
        default: float,
        lo: float,
        hi: float,
        open_range: bool = False,
        open_low: bool = False,
    ) -> float:
        value = self.values.get(name)
        if value is None:
            return default
        number = _as_number(value)
        low_open = open_range or open_low
        ok = (
            number is not None
            and (lo < number if low_open else lo <= number)
            and (number < hi if open_range else number <= hi)
        )
        if not ok:
            bounds = f"{'(' if low_open else '['}{lo}, {hi}{')' if open_range else ']'}"
            raise self._fail(name, f"a finite number in {bounds}")
        return float(number)

    def dimension(self, name: str, default: int, limits: Limits, multiple: int) -> int:
        value = self.values.get(name)
        if value is None:
            return default
        number = _as_number(value)
        if (
            number is None
            or number != int(number)
            or not limits.min_side <= number <= limits.max_side
            or int(number) % multiple
        ):
            raise self._fail(
                name, f"a multiple of {multiple} from {limits.min_side} to {limits.max_side}"
            )
        return int(number)

    def choice(self, name: str, default: str, choices: Mapping[str, str]) -> str:
        value = self.values.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in choices:
            raise self._fail(name, f"one of {', '.join(sorted(set(choices)))}")
        return choices[value.lower()]

    def pair(self, name: str, lo: int, hi: int) -> tuple[int, int] | None:
        value = self.values.get(name)
        if value is None:
            return None
        if isinstance(value, str):  # gRPC parameters can only carry strings: accept "[a, b]"
            try:
                value = json.loads(value)
            except ValueError:
                raise self._fail(name, f"a list of two integers from {lo} to {hi}") from None
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all((n := _as_number(x)) is not None and n == int(n) and lo <= n <= hi for x in value)
        ):
            return int(value[0]), int(value[1])
        raise self._fail(name, f"a list of two integers from {lo} to {hi}")

    def loras(self, adapters: AdapterCatalog) -> tuple[tuple[str, float], ...]:
        value = self.values.get("loras")
        if value is None:
            return ()
        expected = f'a list of at most {MAX_LORAS} adapters, each "name" or {{"name": "...", "scale": number}}'
        if isinstance(value, str) and value.lstrip().startswith("["):  # v2/gRPC parameters are scalars
            try:
                value = json.loads(value)
            except ValueError:
                raise self._fail("loras", expected) from None
        if not isinstance(value, list) or len(value) > MAX_LORAS:
            raise self._fail("loras", expected)
        out: list[tuple[str, float]] = []
        for i, item in enumerate(value):
            where = f"{self.label('loras')}[{i}]"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, Mapping) or set(item) - {"name", "scale"} or not isinstance(item.get("name"), str):
                raise InvalidInput(f"{where}: must be \"name\" or {{\"name\": \"...\", \"scale\": number}}, got {item!r:.200}")
            name, scale = item["name"], _as_number(item.get("scale", 1.0))
            if not adapters.exists(name):
                available = ", ".join(adapters.names()[:20]) or "none"
                raise InvalidInput(f"{where}.name: no adapter named {name!r:.100}; available: {available}")
            if scale is None or not -LORA_SCALE <= scale <= LORA_SCALE:
                raise InvalidInput(f"{where}.scale: must be a number from {-LORA_SCALE} to {LORA_SCALE}, got {item.get('scale')!r:.50}")
            if any(name == n for n, _ in out):
                raise InvalidInput(f"{where}.name: adapter {name!r} is listed twice")
            out.append((name, float(scale)))
        return tuple(out)

    def scheduler(self, family: str) -> str | None:
        value = self.values.get("scheduler")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._fail("scheduler", "a scheduler name")
        try:
            return resolve_scheduler_name(value, family)
        except KeyError as exc:
            raise InvalidInput(f"{self.label('scheduler')}: {exc.args[0]}") from None

    def refiner_mode(self, has_refiner: bool) -> RefinerMode:
        value = self.values.get("refiner")
        default = RefinerMode.ENSEMBLE if has_refiner else RefinerMode.NONE
        if value is None or value is True:
            return default
        if value is False:
            return RefinerMode.NONE
        allowed = [m.value for m in RefinerMode] if has_refiner else [RefinerMode.NONE.value]
        if not isinstance(value, str) or value.lower() not in [m.value for m in RefinerMode]:
            raise self._fail("refiner", f"one of {', '.join(allowed)}")
        mode = RefinerMode(value.lower())
        if mode is not RefinerMode.NONE and not has_refiner:
            raise InvalidInput(
                f"{self.label('refiner')}: {mode.value!r} needs a refiner model and none is loaded; "
                f"allowed: none"
            )
        return mode


def _default_size(model: ModelCapabilities, limits: Limits) -> tuple[int, int]:
    """The model's own size, shrunk (keeping its aspect) when the server's limits are tighter."""
    width, height = model.default_width, model.default_height
    scale = min(1.0, limits.max_side / max(width, height), math.sqrt(limits.max_pixels / (width * height)))
    m = model.size_multiple
    return max(m, int(width * scale) // m * m), max(m, int(height * scale) // m * m)


def _as_number(value: Any) -> float | int | None:
    """A finite int/float (or a numeric string, as gRPC parameters carry them), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eEn") else int(value)
        except ValueError:
            return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None
