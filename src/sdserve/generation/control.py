"""Control inputs inside the step loop: ControlNet residuals, T2I-Adapter features and IP-Adapter
image embeddings per row.

The pipelines (``StableDiffusion[XL]ControlNetPipeline``, ``StableDiffusionXLAdapterPipeline``)
add a ControlNet's residuals to the UNet's skip connections and middle block, and an adapter's
features inside its down blocks. Both are added per row, so images with different controls, and
without any, share one UNet call: a row without a control gets zeros, which leaves its sum as it
is. The rows that use the same ControlNet at this step share one ControlNet call, each row with
its own conditioning scale; a ControlNet applies at step ``i`` of ``n`` unless ``i/n < start`` or
``(i+1)/n > end`` (the pipelines' ``controlnet_keep``); a T2I-Adapter while ``i < int(steps * end)``
(their ``adapter_conditioning_factor``). An adapter's features depend on its image only: they are
computed once per request, at admission; so are an IP-Adapter's image embeddings, which the UNet
reads through the IP-Adapters' attention processors, installed for the calls whose rows use them
with a scale per row (``controls/ip_adapter.py``; a row without one gets scale 0).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from .. import metrics
from ..request.controls import KINDS
from ..request.types import Control, GenerationRequest
from .state import ImageState

_CALLS = {kind: metrics.CONTROL_CALLS.labels(kind=kind) for kind in KINDS}
_ROWS = {kind: metrics.CONTROL_ROWS.labels(kind=kind) for kind in KINDS}


@dataclass(eq=False)
class ControlNetInput:
    model: str
    image: torch.Tensor  # (1, 3, H, W), as the pipeline's prepare_image makes it
    scale: float
    start: float
    end: float


@dataclass(eq=False)
class IPAdapterInput:
    model: str
    scale: float
    embeds: torch.Tensor  # the reference image's, (1, 1, ...)
    negative: torch.Tensor  # the unconditional row's


@dataclass(eq=False)
class RequestControls:
    """One request's controls, ready for every step of its images (base phase only)."""

    controlnets: list[ControlNetInput] = field(default_factory=list)
    adapters: list[tuple[list[torch.Tensor], int]] = field(default_factory=list)  # (scaled features, steps)
    ip_adapters: list[IPAdapterInput] = field(default_factory=list)
    # (IP-Adapter, reference images) where it has several: the policy's group key (policy.py)
    references: tuple[tuple[str, int], ...] = ()
    span: int = 1  # the timesteps a ControlNet's start/end are fractions of

    def adapter_features(self, step: int) -> list[torch.Tensor] | None:
        """The summed features of the adapters that apply at ``step`` (MultiAdapter's order)."""
        active = [features for features, steps in self.adapters if step < steps]
        if not active:
            return None
        total = [f.clone() for f in active[0]]
        for features in active[1:]:
            for k, f in enumerate(features):
                total[k] += f
        return total


def adapter_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """The adapter pipelines' ``_preprocess_adapter_image`` for one PIL image."""
    array = np.array(image.resize((width, height), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
    return torch.from_numpy(array[None].transpose(0, 3, 1, 2))


def prepare(controls: tuple[Control, ...], request: GenerationRequest, models, vae_scale_factor: int,
            device: torch.device, span: int) -> RequestControls:
    """``controls``' images as the pipelines prepare them, and the adapters' features.
    ``models.get(name)`` gives a loaded control model; ``span`` is the base phase's timesteps."""
    prepared = RequestControls(span=span)
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    steps = len(request.timesteps) if request.timesteps is not None else request.num_inference_steps
    for control in controls:
        model = models.get(control.model)
        if control.kind == "ip-adapter":
            embeds, negative = model.embeds(control.image)
            prepared.ip_adapters.append(IPAdapterInput(control.model, control.scale, embeds, negative))
            if embeds.shape[1] > 1:
                prepared.references += ((control.model, embeds.shape[1]),)
            _CALLS["ip-adapter"].inc()
        elif control.kind == "controlnet":
            pixels = processor.preprocess(control.image, height=request.height, width=request.width)
            image = pixels.to(dtype=torch.float32).to(device=device, dtype=model.dtype)
            prepared.controlnets.append(ControlNetInput(control.model, image, control.scale, control.start,
                                                        control.end))
        else:
            pixels = adapter_image(control.image, request.height, request.width).to(device).to(model.dtype)
            features = [f * control.scale for f in model(pixels)]
            prepared.adapters.append((features, int(steps * control.end)))
            _CALLS["t2i-adapter"].inc()
    return prepared


@contextlib.contextmanager
def control_call(phase, row_images: list[ImageState], latents: torch.Tensor, t: torch.Tensor,
                 cond: dict[str, torch.Tensor], models):
    """The UNet's extra arguments for this call's rows, with the IP-Adapters they use installed:
    ControlNet residuals (``down_block_additional_residuals``, ``mid_block_additional_residual``),
    adapter features (``down_intrablock_additional_residuals``) and IP-Adapter embeddings
    (``image_embeds``, for ``added_cond_kwargs``); empty when no row has a control at this step."""
    extra = _residuals(phase, row_images, latents, t, cond, models)
    ip_rows = _ip_rows(row_images)
    if not ip_rows:
        yield extra
        return
    names = tuple(sorted({ip.model for inputs in ip_rows.values() for ip, _ in inputs}))
    embeds, scales = [], []
    for name in names:
        used = {row: (ip, negative) for row, inputs in ip_rows.items() for ip, negative in inputs if ip.model == name}
        zeros = torch.zeros_like(next(iter(used.values()))[0].embeds)
        embeds.append(torch.cat([(used[r][0].negative if used[r][1] else used[r][0].embeds) if r in used else zeros
                                 for r in range(len(row_images))]))
        scales.append(torch.tensor([used[r][0].scale if r in used else 0.0 for r in range(len(row_images))],
                                   dtype=latents.dtype, device=latents.device).view(-1, 1, 1))
    _ROWS["ip-adapter"].inc(len(ip_rows))
    with models.ip_sets.installed(names, [models.get(name) for name in names], scales):
        yield {**extra, "image_embeds": embeds}


def _ip_rows(row_images: list[ImageState]) -> dict[int, list[tuple[IPAdapterInput, bool]]]:
    """Row -> its image's IP-Adapter inputs, each with whether the row is the unconditional one
    (a guided image's first row: it reads the negative embeddings, as in the pipelines)."""
    out, seen = {}, set()
    for row, image in enumerate(row_images):
        negative = image.guided and id(image) not in seen
        seen.add(id(image))
        if image.controls is not None and image.controls.ip_adapters:
            out[row] = [(ip, negative) for ip in image.controls.ip_adapters]
    return out


def _residuals(phase, row_images: list[ImageState], latents: torch.Tensor, t: torch.Tensor,
               cond: dict[str, torch.Tensor], models) -> dict:
    """ControlNet residuals and T2I-Adapter features for the rows that take them at this step."""
    extra: dict = {}
    by_model: dict[str, list[tuple[int, ControlNetInput]]] = {}
    features: dict[int, list[torch.Tensor]] = {}
    for row, image in enumerate(row_images):
        controls: RequestControls | None = image.controls
        if controls is None:
            continue
        i, n = image.step, controls.span
        for net in controls.controlnets:
            if not (i / n < net.start or (i + 1) / n > net.end):
                by_model.setdefault(net.model, []).append((row, net))
        summed = controls.adapter_features(i)
        if summed is not None:
            features[row] = summed
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    # An inpainting UNet's input also holds the mask and the masked image: a ControlNet reads the latents.
    latents = latents[:, : phase.latent_channels]
    for name, members in by_model.items():
        index = torch.tensor([row for row, _ in members], device=latents.device)
        scales = [net.scale for _, net in members]
        # One scale: a number, as the pipeline passes it; several: one per row.
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(
            scales, dtype=latents.dtype, device=latents.device).view(-1, 1, 1, 1)
        kwargs = phase.denoiser_kwargs({k: v.index_select(0, index) for k, v in cond.items()})
        kwargs.pop("timestep_cond", None)  # the pipelines give it to the UNet only
        residuals, middle = models.get(name)(
            latents.index_select(0, index), t.index_select(0, index),
            controlnet_cond=torch.cat([net.image for _, net in members]), conditioning_scale=scale,
            return_dict=False, **kwargs)
        _CALLS["controlnet"].inc()
        _ROWS["controlnet"].inc(len(members))
        if down is None:
            down = [torch.zeros((len(row_images), *r.shape[1:]), dtype=r.dtype, device=r.device) for r in residuals]
            mid = torch.zeros((len(row_images), *middle.shape[1:]), dtype=middle.dtype, device=middle.device)
        for total, part in zip(down, residuals):
            total.index_add_(0, index, part)
        mid.index_add_(0, index, middle)
    if down is not None:
        extra["down_block_additional_residuals"] = down
        extra["mid_block_additional_residual"] = mid
    if features:
        _ROWS["t2i-adapter"].inc(len(features))
        template = next(iter(features.values()))
        extra["down_intrablock_additional_residuals"] = [
            torch.cat([features[row][k] if row in features else torch.zeros_like(f) for row in range(len(row_images))])
            for k, f in enumerate(template)]
    return extra
