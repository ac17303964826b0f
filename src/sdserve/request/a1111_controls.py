"""AUTOMATIC1111's ControlNet request shape, as its ControlNet extension's API takes it:
``"alwayson_scripts": {"controlnet": {"args": [unit, ...]}}`` next to the txt2img/img2img fields,
each unit ``{"image", "model", "module", "weight", "guidance_start", "guidance_end", ...}``.
It becomes sdserve's ``controls`` before validation, so both shapes share every check."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kserve.errors import InvalidInput

SCRIPTS = "alwayson_scripts"
# unit key -> control field
RENAMED = {"model": "model", "weight": "scale", "guidance_start": "start", "guidance_end": "end",
           "module": "preprocessor", "threshold_a": "low_threshold", "threshold_b": "high_threshold"}
# What sdserve does the way the extension's defaults do (the control image is resized to the
# output size, as diffusers' pipelines do): accepted and not used.
IGNORED = ("enabled", "resize_mode", "processor_res", "pixel_perfect", "lowvram", "low_vram", "guessmode",
           "control_mode", "save_detected_map", "hr_option", "input_mode", "batch_images", "mask",
           "effective_region_mask")
MODULES = {"none": "none", "canny": "canny"}  # the extension's module names sdserve runs
_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # "control_v11p_sd15_canny [d14c016b]": the name is before it


class Units:
    """Where each control came from: rewrites an error about ``controls[i].field`` in the terms of
    the unit it was made from (``alwayson_scripts.controlnet.args[j].weight``)."""

    def __init__(self, where: str = "", indexes: list[int] | None = None):
        self.where, self.indexes = where, indexes

    def rename(self, message: str) -> str:
        if self.indexes is None:
            return message
        names = {control: unit for unit, control in RENAMED.items()}
        prefix = re.escape(f"{self.where}controls")

        def unit(match: re.Match) -> str:
            out = f"{self.where}{SCRIPTS}.controlnet.args"
            if match.group(1) is not None:
                out += f"[{self.indexes[int(match.group(1))]}]"
            if match.group(2):
                out += f".{names.get(match.group(2), match.group(2))}"
            return out

        return re.sub(prefix + r"(?:\[(\d+)\](?:\.(\w+))?)?(?!\w)", unit, message)


def from_a1111(values: Mapping[str, Any], where: str = "") -> tuple[Mapping[str, Any], Units]:
    """``values`` with an ``alwayson_scripts.controlnet`` block turned into ``controls`` (other
    scripts are refused: they would be silently ignored), and what names the units in errors."""
    if SCRIPTS not in values:
        return values, Units()
    scripts = values[SCRIPTS]
    label = f"{where}{SCRIPTS}"
    if not isinstance(scripts, Mapping) or set(scripts) - {"controlnet"}:
        raise InvalidInput(f"{label}: only the controlnet script is supported, as {{\"controlnet\": {{\"args\": "
                           f"[...]}}}}; got {list(scripts) if isinstance(scripts, Mapping) else scripts!r:.200}")
    if "controls" in values:
        raise InvalidInput(f"{label}: give controls or alwayson_scripts.controlnet, not both")
    block = scripts.get("controlnet", {})
    units = block.get("args") if isinstance(block, Mapping) else None
    if not isinstance(units, list):
        raise InvalidInput(f"{label}.controlnet.args: must be a list of ControlNet units")
    controls = [_unit(unit, f"{label}.controlnet.args[{i}]") for i, unit in enumerate(units)]
    out = {k: v for k, v in values.items() if k != SCRIPTS}
    kept = [i for i, control in enumerate(controls) if control is not None]
    if kept:
        out["controls"] = [controls[i] for i in kept]
    return out, Units(where, kept)


def _unit(unit: Any, where: str) -> dict[str, Any] | None:
    """One unit as a control, or None for a unit that is off (``enabled: false``, model None)."""
    if not isinstance(unit, Mapping):
        raise InvalidInput(f"{where}: must be an object of ControlNet unit settings")
    unknown = set(unit) - set(RENAMED) - set(IGNORED) - {"image", "input_image"}
    if unknown:
        raise InvalidInput(f"{where}.{sorted(unknown)[0]}: not a setting sdserve reads; accepted: "
                           f"{', '.join(sorted({*RENAMED, *IGNORED, 'image', 'input_image'}))}")
    model = unit.get("model")
    if unit.get("enabled", True) is False or model is None or str(model).lower() == "none":
        return None
    mode = unit.get("control_mode", 0)
    if mode not in (0, "Balanced", "balanced"):
        raise InvalidInput(f"{where}.control_mode: {mode!r:.50} is not supported; allowed: Balanced (0)")
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, Mapping):  # the extension's newer {"image": ..., "mask": ...}
        image = image.get("image")
    if image is None:
        raise InvalidInput(f"{where}.image: required: the control image, base64 (sdserve does not run a "
                           f"preprocessor on the txt2img/img2img input image)")
    control: dict[str, Any] = {"image": image}
    for key, name in RENAMED.items():
        if key in unit and unit[key] is not None:
            control[name] = unit[key]
    control["model"] = _HASH.sub("", str(model))
    module = str(control.get("preprocessor", "none")).lower()
    if module not in MODULES:
        raise InvalidInput(f"{where}.module: {module!r:.50} does not run in sdserve; allowed: "
                           f"{', '.join(MODULES)} (run other preprocessors, e.g. controlnet_aux, on the client)")
    control["preprocessor"] = MODULES[module]
    for name in ("low_threshold", "high_threshold"):  # the canny module's; -1: the extension's default
        if module != "canny" or (isinstance(control.get(name), (int, float)) and control[name] < 1):
            control.pop(name, None)
    return control
