"""A request's control inputs: ControlNet, T2I-Adapter and IP-Adapter images from the server's
control models.

``controls`` is a list of ``{"model", "image", "scale", "start", "end", "preprocessor"}``; each
image is decoded (and run through its preprocessor) here, on the request thread, so that the
worker only resizes it as the pipelines do. The rules between a control and the rest of the
request are here too; the AUTOMATIC1111 request shape is translated by ``a1111_controls.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Protocol

from kserve.errors import InvalidInput
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from . import image_input
from .canny import canny_edges
from .field_types import choice, integer, invalid, json_list, real
from .parameter_errors import Expect
from .types import Control, Limits

CONTROL_SCALE = 2.0  # conditioning scales from 0 to 2 (AUTOMATIC1111's weight range)
KINDS = ("controlnet", "t2i-adapter", "ip-adapter")
MAX_REFERENCES = 4  # reference images one IP-Adapter may take
PREPROCESSORS = ("none", "canny")
# The model classes a control folder may hold (config.json), and the kind each is served as; a
# folder with an image_encoder/ and ip-adapter weights is an "ip-adapter".
CONTROL_CLASSES = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i-adapter"}
CONTROL_FAMILIES = ("sd", "sdxl")  # the UNet families: these control models are UNet add-ons


class ControlCatalog(Protocol):
    """The control models a request may name (names are looked up, never used as paths)."""

    def kind(self, name: str) -> str | None:
        """``controlnet``, ``t2i-adapter`` or ``ip-adapter``; None when there is no such model (after a
        relisting)."""

    def names(self) -> list[str]: ...


class NoControls:
    def kind(self, name: str) -> str | None:
        return None

    def names(self) -> list[str]:
        return []


class ControlSpec(BaseModel):
    """One control input as a request gives it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: Annotated[str, Field(min_length=1, max_length=64), Expect("a control model name")] = Field(
        description="a control model of the server (GET /v1/models/<name>: controls)")
    image: Annotated[Any, WithJsonSchema({"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_REFERENCES},
    ]})] = Field(description="the control image (edges, depth, pose...), base64 PNG/JPEG/WebP or a data: URL; an "
                             f"IP-Adapter's reference picture, or a list of up to {MAX_REFERENCES}")
    scale: real(0.0, CONTROL_SCALE) = Field(1.0, description="conditioning scale (diffusers' "
                                            "controlnet_conditioning_scale, adapter_conditioning_scale, "
                                            "set_ip_adapter_scale)")
    start: real(0.0, 1.0) = Field(0.0, description="the fraction of the steps where it starts to apply")
    end: real(0.0, 1.0) = Field(1.0, description="the fraction of the steps where it stops applying")
    preprocessor: choice({p: p for p in PREPROCESSORS}) = Field(
        "none", description="none: the image is the control image; canny: its Canny edges are")
    low_threshold: integer(1, 255) = Field(100, description="canny: the lower hysteresis threshold")
    high_threshold: integer(1, 255) = Field(200, description="canny: the upper hysteresis threshold")


def _control_list(value: Any) -> Any:
    value = json_list(value)
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise invalid()
    return value


def controls_type(limits: Limits) -> Any:
    return Annotated[tuple[ControlSpec, ...], Field(max_length=limits.max_controls), BeforeValidator(_control_list),
                     Expect(f'a list of at most {limits.max_controls} controls, each {{"model": "...", '
                            f'"image": "<base64>", "scale": 0-{CONTROL_SCALE:g}, "start": 0-1, "end": 0-1}}')]


def resolve_controls(v: Any, catalog: ControlCatalog, model: Any, limits: Limits, *, image: bool,
                     cache: str) -> tuple[Control, ...]:
    """The request's controls, checked against the catalog, the model and the rest of the request."""
    if not v.controls:
        return ()
    label = v.label("controls")
    if model.family not in CONTROL_FAMILIES or model.needs_image:
        raise InvalidInput(f"{label}: control models are for SD 1.x/2.x and SDXL text-to-image models; the "
                           f"loaded model is a {model.pipeline_class}")
    if cache != "none":
        raise InvalidInput(f"{label}: controls change every step's residuals, so cached features would be stale; "
                           f"give cache: none")
    out = []
    for i, spec in enumerate(v.controls):
        where = f"{label}[{i}]"
        kind = catalog.kind(spec.model)
        if kind is None:
            available = ", ".join(catalog.names()[:20]) or "none"
            raise InvalidInput(f"{where}.model: no control model named {spec.model!r:.100}; available: {available}")
        _kind_rules(spec, kind, where, image, v.controls)
        if isinstance(spec.image, list):
            pictures = [_picture(item, f"{where}.image[{k}]", limits) for k, item in enumerate(spec.image)]
            out.append(Control(spec.model, kind, pictures, spec.scale, spec.start, spec.end))
            continue
        picture = _picture(spec.image, f"{where}.image", limits)
        if spec.preprocessor == "canny":
            if spec.low_threshold > spec.high_threshold:
                raise InvalidInput(f"{where}.low_threshold: {spec.low_threshold} is above high_threshold "
                                   f"({spec.high_threshold})")
            picture = canny_edges(picture, spec.low_threshold, spec.high_threshold)
        out.append(Control(spec.model, kind, picture, spec.scale, spec.start, spec.end))
    return tuple(out)


def _picture(value: Any, label: str, limits: Limits):
    """A control image, decoded and checked, in RGB."""
    picture = image_input.decode_image(value, label, limits.max_input_pixels)
    if min(picture.size) < limits.min_side:
        raise InvalidInput(f"{label}: {picture.size[0]}x{picture.size[1]} is smaller than the server minimum of "
                           f"{limits.min_side} pixels a side")
    return picture.convert("RGB")


def _kind_rules(spec: ControlSpec, kind: str, where: str, image: bool, controls: tuple[ControlSpec, ...]) -> None:
    """What a control of ``kind`` may be given, as diffusers' pipelines take it."""
    if spec.start >= spec.end:
        raise InvalidInput(f"{where}.start: {spec.start} must be below end ({spec.end})")
    if isinstance(spec.image, list) and kind != "ip-adapter":
        raise InvalidInput(f"{where}.image: a list is for an IP-Adapter's reference images; a {kind} takes one image")
    if isinstance(spec.image, list) and not 1 <= len(spec.image) <= MAX_REFERENCES:
        raise InvalidInput(f"{where}.image: give 1 to {MAX_REFERENCES} reference images, got {len(spec.image)}")
    if kind == "t2i-adapter" and spec.start != 0:
        raise InvalidInput(f"{where}.start: a T2I-Adapter applies from the first step until end (diffusers' "
                           f"adapter_conditioning_factor); allowed: 0")
    if kind == "t2i-adapter" and image:
        raise InvalidInput(f"{where}.model: {spec.model} is a T2I-Adapter, which is for text-to-image; leave image "
                           f"out or use a ControlNet")
    if kind == "ip-adapter":
        for name, default in (("start", 0.0), ("end", 1.0), ("preprocessor", "none")):
            if getattr(spec, name) != default:
                raise InvalidInput(f"{where}.{name}: an IP-Adapter's reference image applies at every step as it is "
                                   f"(diffusers' ip_adapter_image); allowed: {default}")
        if sum(c.model == spec.model for c in controls) > 1:
            raise InvalidInput(f"{where}.model: IP-Adapter {spec.model} is given twice; give it once, with a list of "
                               f"reference images")
