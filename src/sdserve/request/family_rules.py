"""Rules between fields that only one model family has: a field given that the family would read
as nothing is a 400 naming the field and the family, never a silently different image."""

from __future__ import annotations

from typing import Any

from kserve.errors import InvalidInput

from ..models.capabilities import ModelCapabilities

SKIP_LAYER_SETTINGS = ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")


def resolve_family_fields(v: Any, model: ModelCapabilities, cache: str) -> dict[str, Any]:
    """FLUX's true CFG and SD3's skip-layer guidance, checked and with their defaults (the fields
    the other families refuse stay at those). ``v`` is validation's view of the fields (``has``,
    ``label`` and the values); ``cache`` the request's resolved feature cache."""
    if model.family == "flux":
        _check_flux(v, model, cache)
        return {"true_cfg_scale": v.true_cfg_scale if v.true_cfg_scale is not None else 1.0}
    if model.family == "sd3":
        return _skip_layer_guidance(v, cache)
    return {}


def _check_flux(v: Any, model: ModelCapabilities, cache: str) -> None:
    true_cfg = v.true_cfg_scale is not None and v.true_cfg_scale > 1
    if true_cfg and cache != "none":
        raise InvalidInput(f"{v.label('true_cfg_scale')}: not with cache {cache} (FluxPipeline caches its two "
                           "passes apart; sdserve's rows of one image decide together); give cache none")
    negative = [n for n in ("negative_prompt", "negative_prompt_2") if v.has(n)]
    if v.has("true_cfg_scale") and model.needs_mask:
        raise InvalidInput(f"{v.label('true_cfg_scale')}: {model.pipeline_class} (FLUX.1 Fill) has no true CFG; "
                           "leave true_cfg_scale and negative prompts out")
    if negative and not true_cfg:
        raise InvalidInput(f"{v.label(negative[0])}: FLUX reads a negative prompt only with true CFG: give "
                           "true_cfg_scale above 1 (e.g. 4) as well, or leave the negative prompt out")
    if true_cfg and not v.has("negative_prompt"):
        raise InvalidInput(f"{v.label('true_cfg_scale')}: true CFG needs a negative_prompt (diffusers ignores the "
                           "scale without one)")
    if v.has("scheduler") and v.scheduler not in (None, "Euler"):
        raise InvalidInput(f"{v.label('scheduler')}: FLUX's schedule (sigmas shifted for the image's size) is for "
                           f"the flow-matching Euler sampler; allowed: Euler")
    if v.has("guidance_scale") and not model.guidance_embedded:
        raise InvalidInput(f"{v.label('guidance_scale')}: this FLUX model ({model.pipeline_class}, like FLUX.1 "
                           "[schnell]) embeds no guidance and runs without classifier-free guidance; leave it out "
                           "(true_cfg_scale with a negative_prompt runs true CFG)")


def _skip_layer_guidance(v: Any, cache: str) -> dict[str, Any]:
    """StableDiffusion3Pipeline's skip-layer guidance (SD3.5's SLG): text-to-image with guidance."""
    if not v.has("skip_guidance_layers"):
        for name in SKIP_LAYER_SETTINGS:
            if v.has(name):
                raise InvalidInput(f"{v.label(name)}: applies with skip_guidance_layers (e.g. [7, 8, 9]), not given")
        return {}
    label = v.label("skip_guidance_layers")
    if v.guidance_scale is not None and v.guidance_scale <= 1:
        raise InvalidInput(f"{label}: skip-layer guidance adds to classifier-free guidance: it needs guidance_scale "
                           f"above 1, got {v.guidance_scale}")
    if v.has("image"):
        raise InvalidInput(f"{label}: skip-layer guidance is for text-to-image (diffusers offers it in "
                           "StableDiffusion3Pipeline only); leave it out with an image")
    if cache != "none":
        raise InvalidInput(f"{label}: not with cache {cache} (the cached features are the full model's)")
    out = {"skip_guidance_layers": tuple(v.skip_guidance_layers)}
    out.update({name: getattr(v, name) for name in SKIP_LAYER_SETTINGS if v.has(name)})
    start, stop = out.get("skip_layer_guidance_start", 0.01), out.get("skip_layer_guidance_stop", 0.2)
    if not start < stop:
        raise InvalidInput(f"{v.label('skip_layer_guidance_start')}: must be below skip_layer_guidance_stop "
                           f"({start} >= {stop}); fractions of the steps from 0 to 1")
    return out
