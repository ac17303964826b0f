"""SDXL: the base (``StableDiffusionXLPipeline``) and the refiner (``StableDiffusionXLImg2ImgPipeline``).

Both condition on two CLIP encoders' embeddings, a pooled embedding and "time ids" (size and crop
micro-conditioning; the refiner adds an aesthetic score). Without a negative prompt the base uses
zeroed negative embeddings (``force_zeros_for_empty_prompt``), as diffusers does. In the ensemble
mode the base stops at ``high_noise_frac`` and the refiner takes the latents on from there; in the
refine mode the base finishes and the refiner re-noises the tail of the schedule.
"""

from __future__ import annotations

import inspect

import torch

from ...request.types import GenerationRequest, RefinerMode
from ..state import ImageState, Rows, Schedule
from .common import Phase, negatives


class _SDXLPhase(Phase):
    def __init__(self, pipeline, scheduler_config, scheduler_family: str = "diffusion"):
        super().__init__(pipeline, scheduler_config, scheduler_family)
        # The img2img and inpaint pipelines' time ids take aesthetic scores (read only by a refiner,
        # whose config says requires_aesthetics_score); the text-to-image pipeline's do not.
        defaults = inspect.signature(type(pipeline).__call__).parameters
        self.aesthetic = ((defaults["aesthetic_score"].default, defaults["negative_aesthetic_score"].default)
                          if "aesthetic_score" in defaults else None)

    def encode(self, requests: list[GenerationRequest], guided: bool) -> list[Rows]:
        rows: dict[int, Rows] = {}
        plain = [i for i, r in enumerate(requests) if r.prompt_syntax == "plain"]
        if plain:
            *embeddings, projection = self._embeddings([requests[i] for i in plain], guided)
            for k, i in enumerate(plain):
                rows[i] = self._request_rows(requests[i], k, *embeddings, projection, guided)
        for i, request in enumerate(requests):
            if i not in rows:  # a weighted syntax: compel's conditioning, one request at a time
                weighted = self.weighted_prompts()
                embeds, negative, pooled, negative_pooled = (
                    weighted.refiner if self.pipe.text_encoder is None else weighted.sdxl)(request, guided)
                if guided and negative is None:  # no negative prompt: zeros, as for plain prompts
                    negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
                rows[i] = self._request_rows(request, 0, embeds, negative, pooled, negative_pooled,
                                             self._projection(pooled), guided)
        return [rows[i] for i in range(len(requests))]

    def _request_rows(self, r: GenerationRequest, i: int, embeds, negative, pooled, negative_pooled, projection: int,
                      guided: bool) -> Rows:
        """Request ``r``'s rows: row ``i`` of the embeddings, with its size micro-conditioning."""
        size = (r.height, r.width)
        original, crops, target = r.original_size or size, r.crops_coords_top_left or (0, 0), r.target_size or size
        if self.aesthetic is None:
            time_ids = negative_time_ids = self.pipe._get_add_time_ids(
                original, crops, target, dtype=embeds.dtype, text_encoder_projection_dim=projection)
        else:
            time_ids, negative_time_ids = self.pipe._get_add_time_ids(
                original, crops, target, *self.aesthetic, original, (0, 0), target,
                dtype=embeds.dtype, text_encoder_projection_dim=projection,
            )
        return self._rows(i, r, embeds, negative, pooled, negative_pooled, time_ids, negative_time_ids, guided)

    def encode_pixels(self, pixels: torch.Tensor, dtype: torch.dtype):
        """As the pipelines encode: a VAE that needs it runs in float32 for the call."""
        vae = self.pipe.vae
        pixels = pixels.to(self.device, dtype)
        if not vae.config.force_upcast:
            return vae.encode(pixels).latent_dist
        own = vae.dtype
        vae.to(dtype=torch.float32)
        try:
            return vae.encode(pixels.float()).latent_dist
        finally:
            vae.to(dtype=own)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is None or std is None:
            return vae.config.scaling_factor * latents
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        return (latents - mean) * vae.config.scaling_factor / std

    def _embeddings(self, requests: list[GenerationRequest], guided: bool):
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=[r.prompt for r in requests],
            prompt_2=[r.prompt_2 or r.prompt for r in requests],
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negatives(requests, 1),
            negative_prompt_2=negatives(requests, 2),
        )
        return embeds, negative, pooled, negative_pooled, self._projection(pooled)

    def _projection(self, pooled: torch.Tensor) -> int:
        encoder_2 = self.pipe.text_encoder_2
        return encoder_2.config.projection_dim if encoder_2 is not None else int(pooled.shape[-1])

    def _rows(self, i: int, request, embeds, negative, pooled, negative_pooled, time_ids, negative_time_ids,
              guided: bool) -> Rows:
        extra = self.guidance_condition(request, embeds.dtype)
        cond = {"encoder_hidden_states": embeds[i : i + 1], "text_embeds": pooled[i : i + 1],
                "time_ids": time_ids.to(self.device), **extra}
        if not guided:
            return Rows(cond)
        uncond = {"encoder_hidden_states": negative[i : i + 1], "text_embeds": negative_pooled[i : i + 1],
                  "time_ids": negative_time_ids.to(self.device), **extra}
        return Rows(cond, uncond)

    def denoiser_kwargs(self, cond: dict[str, torch.Tensor]) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "timestep_cond": cond.get("timestep_cond"),
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}

    def call(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], **extra) -> torch.Tensor:
        kwargs = self.denoiser_kwargs(cond)
        if "image_embeds" in extra:  # IP-Adapters read theirs with the added conditioning
            kwargs["added_cond_kwargs"] = {**kwargs["added_cond_kwargs"], "image_embeds": extra.pop("image_embeds")}
        return self.denoiser(latents, t, **kwargs, cross_attention_kwargs=None, return_dict=False, **extra)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As the pipelines decode: a float16 VAE that needs it runs in float32 for the call."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if self.pipe.watermark is not None:
            images = self.pipe.watermark.apply_watermark(images)
        return images


class SDXLBasePhase(_SDXLPhase):
    def plan(self, request: GenerationRequest, image_seed: int, generator: torch.Generator, rows: Rows) -> Schedule:
        scheduler = self.new_scheduler(request, image_seed)
        self.set_timesteps(scheduler, request)
        if request.image is not None:
            timesteps = self.from_strength(scheduler, request)
        else:
            timesteps = scheduler.timesteps
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
        span = len(timesteps)
        if request.refiner is RefinerMode.ENSEMBLE:
            # denoising_end: stop at the first timestep below the cut-off
            total = scheduler.config.num_train_timesteps
            cutoff = int(round(total - request.high_noise_frac * total))
            timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
        return self.schedule(scheduler, timesteps, rows, generator, eta=request.eta, span=span)

    def begin(self, image: ImageState, previous: torch.Tensor | None) -> torch.Tensor:
        dtype = image.schedule.rows.cond["encoder_hidden_states"].dtype
        return self.noise(image, dtype) * image.schedule.scheduler.init_noise_sigma


class SDXLRefinerPhase(_SDXLPhase):
    name = "refiner"
    uses_adapters = False

    def plan(self, request: GenerationRequest, image_seed: int, generator: torch.Generator, rows: Rows) -> Schedule:
        """The img2img pipeline's get_timesteps: from ``denoising_start`` (ensemble) or ``strength``."""
        scheduler = self.new_scheduler(request, image_seed)
        steps = request.num_inference_steps
        self.set_timesteps(scheduler, request)  # custom timesteps never reach a refiner (validation.py)
        if request.refiner is RefinerMode.ENSEMBLE:
            total = scheduler.config.num_train_timesteps
            cutoff = int(round(total - request.high_noise_frac * total))
            count = int((scheduler.timesteps < cutoff).sum().item())
            if scheduler.order == 2 and count % 2 == 0:
                count += 1  # end after a second-order step's second half, as diffusers does
            start = len(scheduler.timesteps) - count
        else:  # refine mode re-runs the base's tail; a refiner served alone starts from the request's image
            strength = request.refiner_strength if request.refiner is RefinerMode.REFINE else request.strength
            start = self.first_step(steps, strength) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        renoise = request.refiner is RefinerMode.REFINE  # img2img adds noise unless denoising_start is given
        return self.schedule(scheduler, timesteps, rows, generator, begin=timesteps[:1].repeat(1) if renoise else None,
                             eta=request.eta)

    def begin(self, image: ImageState, previous: torch.Tensor | None) -> torch.Tensor:
        dtype = image.schedule.rows.cond["encoder_hidden_states"].dtype
        latents = previous.to(device=self.device, dtype=dtype)
        noise_timestep = image.schedule.begin
        if noise_timestep is None:
            return latents
        noise = self.noise(image, dtype)
        return image.schedule.scheduler.add_noise(latents, noise, noise_timestep)
