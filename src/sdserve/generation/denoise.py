"""One denoiser call over the rows of several images, then each image's own guidance and
``scheduler.step``: the pipeline's loop body, for many images at different points of their own
schedules at once."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .. import metrics
from .feature_cache import deep_call, first_block_call, uses_cache
from .image_start import denoiser_input, keep_unmasked
from .policy import padded
from .state import ImageState, Phase

_FULL_ROWS, _CACHED_ROWS = metrics.DENOISER_ROWS.labels(work="full"), metrics.DENOISER_ROWS.labels(work="cached")

# (phase, the image of each row) -> what applies the rows' LoRA adapters during the call
AdapterScope = Callable[[Phase, list[ImageState]], contextlib.AbstractContextManager]
# (phase, the image of each row, latents, timesteps, conditioning) -> a context in which the
# denoiser's control inputs apply, giving its extra arguments
ControlScope = Callable[..., contextlib.AbstractContextManager]


class Denoise:
    """Runs steps for the loop. Keeps the concatenated conditioning of the last selection per
    group: it changes only when images join or leave, not every step."""

    def __init__(self, max_rows: int, pad_rows: bool = False, adapter_scope: AdapterScope | None = None,
                 controls: ControlScope | None = None):
        self.max_rows = max_rows
        self.pad_rows = pad_rows
        self.adapter_scope = adapter_scope or (lambda phase, row_images: contextlib.nullcontext())
        self.controls = controls or (lambda *args: contextlib.nullcontext({}))
        self._conditioning: dict[tuple, tuple[tuple, dict[str, torch.Tensor]]] = {}

    def forget(self, live_groups: set[tuple]) -> None:
        self._conditioning = {k: v for k, v in self._conditioning.items() if k in live_groups}

    def __call__(self, images: list[ImageState]) -> list[tuple[ImageState, Exception]]:
        """Advance every image by one step. A failure of the shared call raises (nothing has
        changed then); a failure in one image's own step is returned with that image."""
        phase = images[0].schedule.phase
        inputs, times, row_images = [], [], []
        for image in images:
            s = image.schedule
            x = denoiser_input(image, phase.scale(s, image.latents, s.timesteps[image.step]))
            inputs += [x] * image.rows
            times += [s.times[image.step]] * image.rows
            row_images += [image] * image.rows
        rows = len(inputs)
        size = padded(rows, self.max_rows) if self.pad_rows else rows
        inputs += [inputs[-1]] * (size - rows)
        times += [times[-1]] * (size - rows)
        row_images += [row_images[-1]] * (size - rows)
        latents = torch.cat(inputs) if size > 1 else inputs[0]
        t = torch.tensor(times, dtype=torch.float32, device=latents.device)
        cond = self._cond(images, size)
        with self.adapter_scope(phase, row_images):  # each row's LoRA adapters
            if uses_cache(images):  # some rows reuse features: they run part of the denoiser
                cached = deep_call if phase.denoiser.__class__.__name__.startswith("UNet") else first_block_call
                output = cached(phase, latents, t, cond, row_images, lambda rows: self.adapter_scope(phase, rows))
            else:
                with self.controls(phase, row_images, latents, t, cond) as extra:  # each row's control inputs
                    output = phase.call(latents, t, cond, **extra)
        skipped = self._skip_layer_rows(phase, images, latents, t, cond)

        cached = sum(im.rows for im in images if im.cache is not None and im.cache.ran and im.cache.ran[-1] == "cached")
        _FULL_ROWS.inc(size - cached)
        if cached:
            _CACHED_ROWS.inc(cached)
        failures = []
        row = 0
        for image in images:
            s = image.schedule
            if image.guided:  # the pipeline's guidance formula, with this image's scale
                uncond, text = output[row : row + 1], output[row + 1 : row + 2]
                noise = uncond + phase.cfg_scale(image.job.request) * (text - uncond)
                if id(image) in skipped:  # skip-layer guidance: away from the text row without some layers
                    noise = noise + (text - skipped[id(image)]) * image.job.request.skip_layer_guidance_scale
            else:
                noise = output[row : row + 1]
                if image.schedule.rows.uncond is not None:  # outside its guidance interval: one row saved
                    image.job.rows_saved["guidance_interval"] += 1
                    metrics.ROWS_SAVED.labels(reason="guidance_interval").inc()
            row += image.rows
            try:
                result = s.scheduler.step(noise, s.timesteps[image.step], image.latents, **s.step_kwargs)
            except Exception as exc:  # noqa: BLE001 - fails this image's request only
                failures.append((image, exc))
                continue
            image.latents = result.prev_sample
            # the step's prediction of the clean latents (LCM names it "denoised")
            image.denoised = getattr(result, "pred_original_sample", None)
            if image.denoised is None:
                image.denoised = getattr(result, "denoised", None)
            image.step += 1
            image.steps_done += 1
            keep_unmasked(image)
        return failures

    def _skip_layer_rows(self, phase: Phase, images: list[ImageState], latents: torch.Tensor, t: torch.Tensor,
                         cond: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """SD3's skip-layer guidance: the text rows of the images inside their window, run again
        without their layers (the pipeline's second transformer call), one call per set of layers."""
        by_layers: dict[tuple[int, ...], list[tuple[ImageState, int]]] = {}
        row = 0
        for image in images:
            layers = phase.skip_layers(image) if image.guided else None
            if layers:
                by_layers.setdefault(layers, []).append((image, row + 1))  # rows: uncond, text
            row += image.rows
        out = {}
        for layers, members in by_layers.items():
            index = torch.tensor([r for _, r in members], device=latents.device)
            with self.adapter_scope(phase, [image for image, _ in members]):
                predicted = phase.call(latents.index_select(0, index), t.index_select(0, index),
                                       {k: v.index_select(0, index) for k, v in cond.items()}, skip_layers=layers)
            _FULL_ROWS.inc(len(members))
            out.update({id(image): predicted[k : k + 1] for k, (image, _) in enumerate(members)})
        return out

    def _cond(self, images: list[ImageState], size: int) -> dict[str, torch.Tensor]:
        key = images[0].group_key()
        selection = (size, *((im.schedule.rows.uid, im.guided) for im in images))
        cached = self._conditioning.get(key)
        if cached is not None and cached[0] == selection:
            return cached[1]
        parts: list[dict[str, torch.Tensor]] = []
        for image in images:
            rows = image.schedule.rows
            parts += [rows.uncond, rows.cond] if image.guided else [rows.cond]
        parts += [parts[-1]] * (size - len(parts))
        cond = {name: torch.cat([p[name] for p in parts]) if len(parts) > 1 else parts[0][name] for name in parts[0]}
        self._conditioning[key] = (selection, cond)
        return cond
