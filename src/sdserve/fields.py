"""The fields a request may carry, and typed access to one request's raw values: each accessor
checks one field and raises ``InvalidInput`` naming it and the allowed values or range."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Protocol

from kserve.errors import InvalidInput

from .request import Limits, RefinerMode
from .schedulers import resolve_scheduler_name

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
    "image": "start image (img2img, inpainting): base64 PNG/JPEG/WebP or a data: URL",
    "mask": "inpainting mask, same encodings: white = repaint, black = keep; needs image",
    "strength": "with image: how much of the schedule runs, (0, 1]; default 0.8, or 1.0 with a mask",
}
ALIASES: dict[str, str] = {
    "denoising_limit": "high_noise_frac",
    "num_images_per_prompt": "num_images",
    "output_image_format": "format",
    # as replicate's cog-sdxl and the AUTOMATIC1111 API name them
    "prompt_strength": "strength",
    "denoising_strength": "strength",
    "init_images": "image",
    "num_outputs": "num_images",
    "steps": "num_inference_steps",
    "cfg_scale": "guidance_scale",
    "sampler_name": "scheduler",
}
MAX_LORAS = 8
LORA_SCALE = 2.0  # scales from -2 to 2


class AdapterCatalog(Protocol):
    """The LoRA adapters a request may name (names are looked up, never used as paths)."""

    def exists(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...


class Fields:
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

    def refiner_mode(self, has_refiner: bool, inpaint: bool = False) -> RefinerMode:
        """Inpainting runs on the base model alone: it defaults to, and allows only, none."""
        value = self.values.get("refiner")
        default = RefinerMode.ENSEMBLE if has_refiner and not inpaint else RefinerMode.NONE
        if value is None or value is True:
            return default
        if value is False:
            return RefinerMode.NONE
        allowed = [m.value for m in RefinerMode] if has_refiner else [RefinerMode.NONE.value]
        if not isinstance(value, str) or value.lower() not in [m.value for m in RefinerMode]:
            raise self._fail("refiner", f"one of {', '.join(allowed)}")
        mode = RefinerMode(value.lower())
        if mode is not RefinerMode.NONE and inpaint:
            raise InvalidInput(f"{self.label('refiner')}: inpainting (a mask) runs on the base model only; allowed: none")
        if mode is not RefinerMode.NONE and not has_refiner:
            raise InvalidInput(
                f"{self.label('refiner')}: {mode.value!r} needs a refiner model and none is loaded; "
                f"allowed: none"
            )
        return mode


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
