"""The oracles for fewer denoiser FLOPs: diffusers' own pipelines with

* the callback diffusers documents for "dynamic CFG" (``callback_on_step_end`` turning guidance off
  and slicing the embeddings to their conditional half), here turning it off and on at the steps a
  ``guidance_interval`` gives: image step i is guided when lo <= i / steps < hi;
* diffusers' First Block Cache hook (``transformer.enable_cache(FirstBlockCacheConfig(...))``)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from sdserve.generation.decode import to_uint8
from sdserve.models.loading import LoadedModel
from sdserve.models.schedulers import build_scheduler
from sdserve.request.types import GenerationRequest


def _guided_steps(request: GenerationRequest) -> list[bool]:
    lo, hi = request.guidance_interval
    n = request.num_inference_steps
    return [lo <= i / n < hi for i in range(n)]


@torch.inference_mode()
def interval_images(model: LoadedModel, request: GenerationRequest) -> list[np.ndarray]:
    """``request`` (text-to-image, base model) through its pipeline, guidance switched by callback."""
    pipe, g = model.base, request.guidance_scale
    guided = _guided_steps(request)
    sdxl = model.capabilities.family == "sdxl"
    negative = request.negative_prompt
    if sdxl:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            request.prompt, request.prompt_2, device=pipe.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative, negative_prompt_2=request.negative_prompt_2)
        size = (request.height, request.width)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        halves = {"prompt_embeds": (neg, embeds), "add_text_embeds": (neg_pooled, pooled),
                  "add_time_ids": (time_ids, time_ids)}
        given = {"prompt_embeds": embeds, "negative_prompt_embeds": neg, "pooled_prompt_embeds": pooled,
                 "negative_pooled_prompt_embeds": neg_pooled}
    else:
        embeds, neg = pipe.encode_prompt(request.prompt, pipe.device, 1, True, negative)
        halves = {"prompt_embeds": (neg, embeds)}
        given = {"prompt_embeds": embeds, "negative_prompt_embeds": neg}

    def switch(pipeline, step, timestep, kwargs):
        if step + 1 < len(guided) and guided[step + 1] != guided[step]:
            on = guided[step + 1]
            pipeline._guidance_scale = g if on else 1.0
            for name, (uncond, cond) in halves.items():
                kwargs[name] = torch.cat([uncond, cond]) if on else cond
        return kwargs

    images = []
    for seed in request.seeds:
        pipe.scheduler = build_scheduler(request.scheduler, model.scheduler_config, [seed],
                                         model.capabilities.scheduler_family)
        images.append(pipe(**given, width=request.width, height=request.height,
                           num_inference_steps=request.num_inference_steps,
                           guidance_scale=g if guided[0] else 1.0,  # step 0 before any callback
                           generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=switch,
                           callback_on_step_end_tensor_inputs=list(halves), output_type="np").images[0])
    return list(to_uint8(np.stack(images)))


@torch.inference_mode()
def first_block_cache_images(model: LoadedModel, request: GenerationRequest) -> list[np.ndarray]:
    """``request`` (SD3, FLUX) through its pipeline with diffusers' First Block Cache on (a copy of)
    the transformer: ``apply_first_block_cache``, as ``enable_cache`` does for the models that have
    it, in one cache context for the whole call (the CFG rows of one image decide together)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    pipe = model.base
    original = pipe.transformer
    images = []
    for seed in request.seeds:
        pipe.scheduler = build_scheduler(request.scheduler, model.scheduler_config, [seed],
                                         model.capabilities.scheduler_family)
        pipe.transformer = copy.deepcopy(original)
        # a registry copied from an earlier pipeline call caches that no block has hooks: start anew
        vars(pipe.transformer).pop("_diffusers_hook", None)
        if model.capabilities.family == "sd3":
            _last_block_returns_both(pipe.transformer)
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=request.cache_threshold))
        # what CacheMixin.cache_context does around each denoiser call in the pipelines that have it
        _set_cache_context(pipe.transformer, CacheContext("cond_uncond"))
        try:
            negative = {"negative_prompt": request.negative_prompt} if model.capabilities.family == "sd3" else {}
            images.append(pipe(prompt=request.prompt, **negative, width=request.width,
                               height=request.height, num_inference_steps=request.num_inference_steps,
                               guidance_scale=request.guidance_scale,
                               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0])
        finally:
            pipe.transformer = original
    return list(to_uint8(np.stack(images)))


def _last_block_returns_both(transformer) -> None:
    """SD3's last block returns no encoder states (``context_pre_only``), and diffusers' tail hook
    subtracts them all the same (None - tensor): hand it the states the block was given. Only the
    image states reach the output, so nothing else changes."""
    last = transformer.transformer_blocks[-1]
    forward = last.forward

    def both(*args, **kwargs):
        encoder, hidden = forward(*args, **kwargs)
        return (kwargs["encoder_hidden_states"] if encoder is None else encoder), hidden

    last.forward = both
