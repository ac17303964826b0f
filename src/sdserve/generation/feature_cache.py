"""Features reused between steps, per image, inside shared denoiser calls (``request.cache``).

diffusers' cache hooks (First Block Cache and the others) keep one state per model for one
pipeline call; here the rows of a call belong to many images at different steps, so each image
keeps its own state, as plain data beside its scheduler (``state.FeatureCache``), and a call runs
each row as far as its image needs:

* ``deep`` (UNet models, DeepCache): an image's full steps are every ``cache_interval``-th of its
  phase; at the others its rows skip the blocks below the first down block and reuse what entered
  the last up block at its last full step. A call whose rows are all full runs as one call (the
  entering feature is read on the way); otherwise the full rows run as one call and the cached ones
  as a second, shallow call (``partial_forward.unet_shallow``): a call of fewer rows each.
* ``first_block`` (SD3): one call. Every row runs the first block; an image whose first-block
  residual changed by less than ``cache_threshold`` since its last full step skips the other
  blocks and adds the residual they added then (``partial_forward.sd3_first_block``).

Each image logs what ran at each of its calls (``FeatureCache.ran``), and its request counts the
rows that skipped work (``Job.rows_saved``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import metrics
from .partial_forward import last_up_block_input, unet_shallow
from .state import ImageState

Scope = Callable[[list[ImageState]], Any]  # the LoRA adapters of these rows' images, for a sub-call


def uses_cache(images: list[ImageState]) -> bool:
    return any(im.cache is not None for im in images)


def _slots(row_images: list[ImageState]) -> list[int]:
    """Each row's place among its image's rows (0: unconditional, 1: conditional when guided);
    padding rows repeat the last."""
    seen: dict[int, int] = {}
    slots = []
    for image in row_images:
        slot = seen.get(id(image), 0)
        slots.append(min(slot, image.rows - 1))
        seen[id(image)] = slot + 1
    return slots


def _take(values: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: tensor.index_select(0, index) for name, tensor in values.items()}


def _log(image: ImageState, ran: str) -> None:
    if image.cache is not None:
        image.cache.ran.append(ran)
        if ran == "cached":
            image.job.rows_saved["cache"] += image.rows
            metrics.ROWS_SAVED.labels(reason="cache").inc(image.rows)


def _full_at(image: ImageState, phase: str) -> bool:
    cache = image.cache
    if cache is None or cache.mode != "deep":
        return True
    if cache.phase != phase or cache.deep is None or cache.deep.shape[0] < image.rows:
        return True
    return image.step % cache.interval == 0


def deep_call(phase, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
              row_images: list[ImageState], scope: Scope) -> torch.Tensor:
    """One UNet step for rows whose images may reuse their deep features (see the module doc)."""
    unet, device = phase.denoiser, latents.device
    full = [r for r, im in enumerate(row_images) if _full_at(im, phase.name)]
    cached = [r for r in range(len(row_images)) if r not in full]
    slots = _slots(row_images)
    parts: list[tuple[list[int], torch.Tensor]] = []
    if full:
        index = torch.tensor(full, device=device)
        sub = (latents, t, cond) if not cached else (latents.index_select(0, index), t.index_select(0, index),
                                                      _take(cond, index))
        read, handle = last_up_block_input(unet)
        try:
            with scope([row_images[r] for r in full]):
                parts.append((full, phase.call(*sub)))
        finally:
            handle.remove()
        deep = read()
        for image in {id(row_images[r]): row_images[r] for r in full}.values():
            if image.cache is not None and image.cache.mode == "deep":
                rows = [k for k, r in enumerate(full) if row_images[r] is image][: image.rows]
                image.cache.deep, image.cache.phase = deep[rows], phase.name
    if cached:
        index = torch.tensor(cached, device=device)
        sub_cond = _take(cond, index)
        deep = torch.cat([row_images[r].cache.deep[row_images[r].cache.deep.shape[0] - row_images[r].rows + slots[r]]
                          .unsqueeze(0) for r in cached])
        with scope([row_images[r] for r in cached]):
            parts.append((cached, unet_shallow(unet, latents.index_select(0, index), t.index_select(0, index), deep,
                                               **phase.denoiser_kwargs(sub_cond))))
    for image in {id(im): im for im in row_images}.values():
        _log(image, "full" if any(row_images[r] is image for r in full) else "cached")
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    output = first.new_empty((len(row_images), *first.shape[1:]))
    for rows, values in parts:
        output[torch.tensor(rows, device=device)] = values
    return output


def first_block_call(phase, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                     row_images: list[ImageState], scope: Scope) -> torch.Tensor:
    """One transformer step (SD3, FLUX) with First Block Cache per image (see the module doc)."""
    images = list({id(im): im for im in row_images}.values())
    rows_of = {id(im): [r for r, other in enumerate(row_images) if other is im] for im in images}
    decisions: dict[int, str] = {}

    def decide(residual: torch.Tensor) -> list[int]:
        compute = []
        for image in images:
            rows, cache = rows_of[id(image)], image.cache
            ready = (cache is not None and cache.mode == "first_block" and cache.phase == phase.name
                     and cache.head is not None and cache.head.shape[0] == len(rows))
            if ready:
                change = (residual[rows] - cache.head).abs().mean() / cache.head.abs().mean()
                ready = change.item() <= cache.threshold  # diffusers' FBCHeadBlockHook: compute when above
            decisions[id(image)] = "cached" if ready else "full"
            compute += [] if ready else rows
        return sorted(compute)

    def store(rows: list[int], residual: torch.Tensor, tail: torch.Tensor) -> None:
        for image in images:
            mine = [k for k, r in enumerate(rows) if row_images[r] is image]
            if mine and image.cache is not None:
                image.cache.head, image.cache.tail, image.cache.phase = residual[mine], tail[mine], phase.name

    def reuse(rows: list[int]) -> torch.Tensor:
        slot = {r: rows_of[id(row_images[r])].index(r) for r in rows}
        return torch.cat([row_images[r].cache.tail[slot[r]].unsqueeze(0) for r in rows])

    output = phase.first_block(latents, t, cond, decide=decide, store=store, reuse=reuse,
                               scope=lambda rows: scope([row_images[r] for r in rows]))
    for image in images:
        _log(image, decisions[id(image)])
    return output
