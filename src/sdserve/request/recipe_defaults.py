"""A request's fields filled in from the recipes (``sdserve.json``, see ``recipes.py``) of the
adapters it names, and from the fused adapter's recipe: the server's defaults below them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kserve.errors import InvalidInput

from ..models.schedulers import FAMILIES, resolve_scheduler_name
from .fields import ALIASES

RECIPE_FILE = "sdserve.json"
SIZE_FIELDS = ("width", "height")  # a start image's own size wins over a recipe's
SAMPLER_TUNING = ("eta", "timestep_spacing", "timesteps")  # settings of the recipe's sampler


def _lora_items(value: Any) -> list | None:
    """The request's loras as a list (v2/gRPC send JSON text), or None when absent or malformed
    (validation then reports it)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, list) else None


def _name(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
        return item["name"]
    return None


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _scheduler_key(value: Any) -> Any:
    """A sampler name as validation will resolve it (either family), to compare two names."""
    if not isinstance(value, str):
        return value
    for family in FAMILIES:
        try:
            return resolve_scheduler_name(value, family)
        except KeyError:
            pass
    return value


def _left_out(key: str, recipe: Mapping[str, Any], fixed: Mapping[str, Any]) -> bool:
    """Whether a recipe's ``key`` stays out because of fields set above it (by the request, or by
    the named adapters' recipes for the fused adapter's): they would contradict, not complete, them."""
    if key in fixed:
        return True
    if key in SIZE_FIELDS and "image" in fixed:  # the start image's size
        return True
    if key == "timesteps" and fixed.keys() & {"num_inference_steps", "timestep_spacing", "image"}:
        return True  # a schedule of its own (and img2img makes its schedule from strength)
    if key in ("num_inference_steps", "timestep_spacing") and "timesteps" in fixed:
        return True
    if key in SAMPLER_TUNING and "scheduler" in fixed:  # tuned for the recipe's sampler, not another
        return _scheduler_key(fixed["scheduler"]) != _scheduler_key(recipe.get("scheduler"))
    return False


def apply_recipes(values: Any, adapters: Any, where: str = "") -> Any:
    """``values`` with the recipes of the adapters it names (and the fused adapter's) filled in
    for the fields it leaves out, and their scales for lora entries without one. Values that are
    not a mapping, or a catalog without recipes, come back as they are.

    Fields the request gives win, and so do the named adapters' recipes over the fused adapter's;
    a recipe's field that would contradict a field set above it stays out: its sizes beside a
    start image, its timesteps beside num_inference_steps or timestep_spacing (and the other way
    round), its sampler settings (eta, timestep_spacing, timesteps) beside another scheduler."""
    recipe_of = getattr(adapters, "recipe", None)
    if recipe_of is None or not isinstance(values, Mapping):
        return values
    fused = getattr(adapters, "fused", None)
    refused: Mapping[str, str] = getattr(adapters, "refused", {})
    items = _lora_items(values.get("loras"))
    named: list[tuple[str, Any]] = []  # (adapter, its recipe)
    new_items, changed = [], False
    for i, item in enumerate(items or ()):
        name = _name(item)
        if name is not None and fused is not None and name == fused.name:
            raise InvalidInput(
                f"{where}loras[{i}].name: adapter {name!r} is fused into the model (--fuse_lora "
                f"{fused.name}:{fused.scale:g}), so every request already has it; leave it out"
            )
        recipe = recipe_of(name) if name is not None else None
        if recipe is None and name in refused:
            raise InvalidInput(f"{where}loras[{i}].name: adapter {name!r} is not offered: its {RECIPE_FILE} "
                               f"is refused ({refused[name]})")
        if recipe is not None:
            named.append((name, recipe))
            if recipe.scale is not None and (isinstance(item, str) or item.get("scale") is None):
                item = {**({} if isinstance(item, str) else item), "name": name, "scale": recipe.scale}
                changed = True
        new_items.append(item)
    defaults = fused.recipe.fields if fused is not None and fused.recipe is not None else {}
    if not named and not defaults and not changed:
        return values

    given = {ALIASES.get(k, k): v for k, v in values.items() if v is not None}
    chosen: dict[str, tuple[str, Any]] = {}
    for name, recipe in named:
        for key, value in recipe.fields.items():
            if _left_out(key, recipe.fields, given):
                continue
            if key in chosen and chosen[key][1] != value:
                other, theirs = chosen[key]
                raise InvalidInput(
                    f"{where}loras: adapters {other!r} and {name!r} disagree on {key} ({_show(theirs)} vs "
                    f"{_show(value)}); set it in the request"
                )
            chosen.setdefault(key, (name, value))
    fixed = {**given, **{key: value for key, (_, value) in chosen.items()}}
    for key, value in defaults.items():
        if not _left_out(key, defaults, fixed):
            chosen[key] = (fused.name, value)
    # a null field means "the default": the recipe's now (and no alias may stay beside it)
    out = {k: v for k, v in values.items() if not (v is None and ALIASES.get(k, k) in chosen)}
    out.update({key: value for key, (_, value) in chosen.items()})
    if changed:
        out["loras"] = new_items
    return out
