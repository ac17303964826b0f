"""FLUX.1 (``FluxPipeline``): a rectified-flow transformer over 2x2-packed latents, CLIP (pooled)
and T5 prompts, image-position ids, and the flow-match schedule shifted for the image's size.

[dev] embeds its guidance scale in the transformer (one row per image: no classifier-free
guidance); [schnell] has no guidance at all. diffusers' "true CFG" runs a second row with a
negative prompt when ``true_cfg_scale`` > 1. The latents are kept unpacked (1, 16, h, w) between
steps: the sampler's arithmetic is elementwise, so packing only around the transformer gives the
pipeline's numbers, and groups, previews and image inputs see ordinary latents.

FLUX.1 Fill (``FluxFillPipeline``) is the inpainting model: its transformer also reads the masked
image's latents and the pixel mask folded 8x8 into 64 channels, each packed on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ...request.types import GenerationRequest
from ..partial_forward import flux_first_block
from ..state import Rows, Schedule
from .sd3 import StableDiffusion3Phase

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default: what T5 reads of prompt_2 (or prompt)


class FluxPhase(StableDiffusion3Phase):
    def __init__(self, pipeline, scheduler_config, scheduler_family: str = "flow"):
        super().__init__(pipeline, scheduler_config, scheduler_family)
        # The transformer reads packed latents (4 channels per latent channel); Fill reads more.
        self.mask_channels = self.denoiser.config.in_channels != 4 * self.latent_channels
        self.skips_start_at_full_strength = False  # Fill samples the start image's latents at strength 1 too
        self.embeds_guidance = bool(self.denoiser.config.guidance_embeds)

    def guided(self, request: GenerationRequest) -> bool:
        """A second (negative) row only for true CFG, as FluxPipeline does."""
        return request.true_cfg_scale > 1 and request.negative_prompt is not None

    def cfg_scale(self, request: GenerationRequest) -> float:
        return request.true_cfg_scale

    def encode(self, requests: list[GenerationRequest], guided: bool) -> list[Rows]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=[r.prompt for r in requests], prompt_2=[r.prompt_2 or r.prompt for r in requests],
            device=self.device, num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH)
        if guided:
            negative, negative_pooled, _ = self.pipe.encode_prompt(
                prompt=[r.negative(1) for r in requests], prompt_2=[r.negative(2) for r in requests],
                device=self.device, num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH)
        rows = []
        for i, request in enumerate(requests):
            extra = {}
            if self.embeds_guidance:  # [dev]: the guidance scale is an input, one value per row
                extra["guidance"] = torch.full([1], request.guidance_scale, device=self.device, dtype=torch.float32)
            cond = {"encoder_hidden_states": embeds[i : i + 1], "pooled_projections": pooled[i : i + 1], **extra}
            uncond = None
            if guided:
                uncond = {"encoder_hidden_states": negative[i : i + 1],
                          "pooled_projections": negative_pooled[i : i + 1], **extra}
            rows.append(Rows(cond, uncond))
        return rows

    def plan(self, request: GenerationRequest, image_seed: int, generator: torch.Generator, rows: Rows) -> Schedule:
        """FluxPipeline's schedule: sigmas 1 .. 1/n, shifted by ``mu`` for the image's token count."""
        scheduler = self.new_scheduler(request, image_seed)
        n = request.num_inference_steps
        config = scheduler.config
        patch = self.pipe.vae_scale_factor * 2  # pixels per packed token, a side
        seq_len = (request.height // patch) * (request.width // patch)
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
        scheduler.set_timesteps(n, device=self.device, sigmas=sigmas, mu=mu)
        if request.image is not None:
            timesteps = self.from_strength(scheduler, request)
        else:
            timesteps = scheduler.timesteps
            scheduler.set_begin_index(0)
        return self.schedule(scheduler, timesteps, rows, generator)

    def denoiser_kwargs(self, cond: dict[str, torch.Tensor]) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "pooled_projections": cond["pooled_projections"], "guidance": cond.get("guidance")}

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Fill's mask input: each latent pixel's 8x8 mask pixels as 64 channels (FluxFillPipeline's
        prepare_mask_latents); the base model blends with the mask scaled to latent size."""
        if not self.mask_channels:
            return super().latent_mask(mask)
        scale = self.pipe.vae_scale_factor
        rows, _, height, width = mask.shape
        folded = mask[:, 0].view(rows, height // scale, scale, width // scale, scale).permute(0, 2, 4, 1, 3)
        return folded.reshape(rows, scale * scale, height // scale, width // scale)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Rows (latents, and for Fill the mask and masked image's latents) as the transformer's tokens."""
        def packed(x: torch.Tensor) -> torch.Tensor:
            return self.pipe._pack_latents(x, *x.shape)

        if not self.mask_channels:
            return packed(latents)
        c = self.latent_channels
        image, mask, masked = latents.split([c, latents.shape[1] - 2 * c, c], dim=1)
        return torch.cat([packed(image), packed(masked), packed(mask)], dim=2)  # Fill's order

    def call(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer over packed rows: (rows, channels, h, w) in, (rows, 16, h, w) out."""
        return self._packed(self.denoiser, latents, t, cond, joint_attention_kwargs=None, return_dict=False)

    def first_block(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                    **hooks: Any) -> torch.Tensor:
        """``call`` with First Block Cache per row (``feature_cache.first_block_call``'s hooks)."""
        return self._packed(functools.partial(flux_first_block, self.denoiser), latents, t, cond, **hooks)

    def _packed(self, forward: Callable, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                **extra: Any) -> torch.Tensor:
        rows, _, height, width = latents.shape
        channels = self.latent_channels
        image_ids = self.pipe._prepare_latent_image_ids(rows, height // 2, width // 2, latents.device, latents.dtype)
        kwargs = self.denoiser_kwargs(cond)
        text_ids = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        out = forward(hidden_states=self.pack(latents), timestep=t.to(latents.dtype) / 1000, txt_ids=text_ids,
                      img_ids=image_ids, **kwargs, **extra)
        out = out[0] if isinstance(out, tuple) else out
        out = out.view(rows, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(rows, channels, height, width)
