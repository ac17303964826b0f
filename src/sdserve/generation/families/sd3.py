"""SD3 (``StableDiffusion3Pipeline``): an MMDiT transformer with flow matching, two CLIP encoders
and an optional T5 (``--drop_t5``: its embeddings are zeros, as diffusers does without it)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ...request.types import GenerationRequest
from ..partial_forward import sd3_first_block
from ..state import ImageState, Rows, Schedule
from .common import Phase, negatives


class StableDiffusion3Phase(Phase):
    passes_step_kwargs = False

    def encode(self, requests: list[GenerationRequest], guided: bool) -> list[Rows]:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=[r.prompt for r in requests],
            prompt_2=[r.prompt_2 or r.prompt for r in requests],
            prompt_3=[r.prompt_3 or r.prompt for r in requests],
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negatives(requests, 1),
            negative_prompt_2=negatives(requests, 2),
            negative_prompt_3=negatives(requests, 3),
        )
        rows = []
        for i in range(len(requests)):
            cond = {"encoder_hidden_states": embeds[i : i + 1], "pooled_projections": pooled[i : i + 1]}
            if not guided:
                rows.append(Rows(cond))
                continue
            uncond = {"encoder_hidden_states": negative[i : i + 1], "pooled_projections": negative_pooled[i : i + 1]}
            rows.append(Rows(cond, uncond))
        return rows

    def plan(self, request: GenerationRequest, image_seed: int, generator: torch.Generator, rows: Rows) -> Schedule:
        scheduler = self.new_scheduler(request, image_seed)
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):  # resolution-dependent shift, as the pipeline does
            patch, scale = self.denoiser.config.patch_size, self.pipe.vae_scale_factor
            seq_len = (request.height // scale // patch) * (request.width // scale // patch)
            kwargs["mu"] = calculate_shift(seq_len, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.16))
        scheduler.set_timesteps(request.num_inference_steps, device=self.device, **kwargs)
        timesteps = scheduler.timesteps if request.image is None else self.from_strength(scheduler, request)
        return self.schedule(scheduler, timesteps, rows, generator)

    def first_step(self, steps: int, strength: float) -> int:
        return int(max(steps - min(steps * strength, steps), 0))  # SD3's get_timesteps keeps the fraction

    def init_noise_sigma(self, scheduler) -> float:
        return 1.0  # flow matching starts from unscaled noise

    def add_noise(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_noise(latents, t, noise)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def begin(self, image: ImageState, previous: torch.Tensor | None) -> torch.Tensor:
        return self.noise(image, image.schedule.rows.cond["encoder_hidden_states"].dtype)

    def scale(self, schedule: Schedule, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents  # flow matching feeds the latents as they are

    def denoiser_kwargs(self, cond: dict[str, torch.Tensor]) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"]}

    def skip_layers(self, image: ImageState) -> tuple[int, ...] | None:
        """StableDiffusion3Pipeline's window: steps i with start * n < i < stop * n."""
        request = image.job.request
        n = request.num_inference_steps
        if request.skip_guidance_layers is None:
            return None
        inside = n * request.skip_layer_guidance_start < image.step < n * request.skip_layer_guidance_stop
        return request.skip_guidance_layers if inside else None

    def call(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
             skip_layers: tuple[int, ...] | None = None) -> torch.Tensor:
        extra = {"skip_layers": list(skip_layers)} if skip_layers else {}
        return self.denoiser(hidden_states=latents, timestep=t, **self.denoiser_kwargs(cond),
                             joint_attention_kwargs=None, return_dict=False, **extra)[0]

    def first_block(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                    **hooks: Any) -> torch.Tensor:
        """``call`` with First Block Cache per row (``feature_cache.first_block_call``'s hooks)."""
        return sd3_first_block(self.denoiser, latents, t, **self.denoiser_kwargs(cond), **hooks)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
