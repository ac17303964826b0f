"""SD 1.x / 2.x (``StableDiffusionPipeline``): one CLIP text encoder, epsilon or v-prediction (the
scheduler reads ``prediction_type`` from the model's own scheduler config)."""

from __future__ import annotations

import numpy as np
import torch

from ...request.types import GenerationRequest
from ..state import ImageState, Rows, Schedule
from .common import Phase, negatives


class StableDiffusionPhase(Phase):
    def encode(self, requests: list[GenerationRequest], guided: bool) -> list[Rows]:
        rows: dict[int, Rows] = {}
        plain = [i for i, r in enumerate(requests) if r.prompt_syntax == "plain"]
        if plain:
            embeds, negative = self.pipe.encode_prompt(
                [requests[i].prompt for i in plain], self.device, 1, guided,
                negatives([requests[i] for i in plain], 1),
            )
            for k, i in enumerate(plain):
                rows[i] = self._rows(requests[i], embeds[k : k + 1], negative[k : k + 1] if guided else None)
        for i, request in enumerate(requests):
            if i not in rows:  # a weighted syntax: compel's conditioning, one request at a time
                rows[i] = self._rows(request, *self.weighted_prompts().sd(request, guided))
        return [rows[i] for i in range(len(requests))]

    def _rows(self, request: GenerationRequest, embeds: torch.Tensor, negative: torch.Tensor | None) -> Rows:
        cond = {"encoder_hidden_states": embeds, **self.guidance_condition(request, embeds.dtype)}
        return Rows(cond, {**cond, "encoder_hidden_states": negative} if negative is not None else None)

    def plan(self, request: GenerationRequest, image_seed: int, generator: torch.Generator, rows: Rows) -> Schedule:
        scheduler = self.new_scheduler(request, image_seed)
        self.set_timesteps(scheduler, request)
        timesteps = scheduler.timesteps if request.image is None else self.from_strength(scheduler, request)
        return self.schedule(scheduler, timesteps, rows, generator, eta=request.eta)

    def begin(self, image: ImageState, previous: torch.Tensor | None) -> torch.Tensor:
        dtype = image.schedule.rows.cond["encoder_hidden_states"].dtype
        return self.noise(image, dtype) * image.schedule.scheduler.init_noise_sigma

    def denoiser_kwargs(self, cond: dict[str, torch.Tensor]) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "timestep_cond": cond.get("timestep_cond")}

    def call(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], **extra) -> torch.Tensor:
        added = {"image_embeds": extra.pop("image_embeds")} if "image_embeds" in extra else None  # IP-Adapters'
        return self.denoiser(latents, t, **self.denoiser_kwargs(cond), cross_attention_kwargs=None,
                             added_cond_kwargs=added, return_dict=False, **extra)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    def postprocess(self, images: torch.Tensor) -> np.ndarray:
        # no safety checker is loaded: every image is denormalised
        return self.pipe.image_processor.postprocess(images, output_type="np", do_denormalize=[True] * len(images))
