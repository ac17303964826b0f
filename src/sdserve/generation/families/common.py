"""What every model family shares: a *phase* is one denoiser's part of making an image.

A phase is built from a loaded diffusers pipeline and uses the pipeline's own components and
helpers (``encode_prompt``, its scheduler classes, denoiser, VAE and image processor) in the order
its ``__call__`` does, so that an image equals ``pipeline(...)``'s for the same seed. What the
pipeline does once for a whole batch, a phase does per request (``encode``), per image (``plan``,
``begin``) or per denoiser call over rows of many images (``call``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ...models.embeddings import PromptVocabulary
from ...models.schedulers import build_scheduler
from ...request.types import GenerationRequest
from ..state import ImageState, Rows, Schedule
from ..weighted_prompts import WeightedPrompts


def negatives(requests: list[GenerationRequest], encoder: int) -> list[str] | None:
    """Negative prompts for text encoder ``encoder`` (1-3), or None when the requests give none
    (SDXL then zeroes the negative embedding, as diffusers does). The requests agree on that."""
    if requests[0].negative_prompt is None:
        return None
    return [r.negative(encoder) for r in requests]


@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(scheduler_class.step).parameters)


def mask_processor(phase: "Phase") -> VaeImageProcessor:
    """The inpaint pipelines' mask processor: grayscale, binarised at 0.5, not normalised."""
    return VaeImageProcessor(vae_scale_factor=phase.pipe.vae_scale_factor, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


class Phase:
    """One denoiser of a loaded pipeline, driven one step at a time."""

    name = "base"
    uses_adapters = True  # LoRA adapters are loaded into the base pipeline only
    passes_step_kwargs = True  # SD/SDXL pass eta and generator to scheduler.step; SD3 passes neither

    def __init__(self, pipeline: Any, scheduler_config: dict[str, Any], scheduler_family: str = "diffusion"):
        self.pipe = pipeline
        self.scheduler_config = scheduler_config
        self.scheduler_family = scheduler_family
        self.denoiser = pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet
        self.device = pipeline._execution_device  # the GPU even when offloading
        self.time_cond_dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        self.latent_channels = pipeline.vae.config.latent_channels
        # An inpainting denoiser also reads the mask (1 channel) and the masked image's latents.
        self.mask_channels = self.denoiser.config.in_channels != self.latent_channels
        # At strength 1 the inpainting pipelines start from noise without sampling the start image
        # (so its draw from the generator is skipped); FLUX Fill samples it all the same.
        self.skips_start_at_full_strength = True
        self.masks = mask_processor(self)
        self.vocabulary: PromptVocabulary | None = None  # weighted prompts' tokenizers (set by the backend)
        self._weighted: WeightedPrompts | None = None

    def weighted_prompts(self) -> WeightedPrompts:
        """compel over this pipeline's encoders, for prompts in a weighted syntax (built on first use)."""
        if self._weighted is None:
            self._weighted = WeightedPrompts(self.pipe, self.vocabulary or PromptVocabulary(), self.device)
        return self._weighted

    # -- per request -----------------------------------------------------------------------
    def guided(self, request: GenerationRequest) -> bool:
        """Classifier-free guidance: two rows per step. Guidance-distilled UNets (a time-condition
        projection, as LCM's) take the scale as an input instead, as the pipelines do."""
        return request.guidance_scale > 1 and self.time_cond_dim is None

    def cfg_scale(self, request: GenerationRequest) -> float:
        """The classifier-free guidance scale of the two rows' formula."""
        return request.guidance_scale

    def encode(self, requests: list[GenerationRequest], guided: bool) -> list[Rows]:
        """Conditioning rows per request, in one text-encoder batch. The requests agree on
        ``guided`` and on whether a negative prompt was given."""
        raise NotImplementedError

    def guidance_condition(self, request: GenerationRequest, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The guidance-scale embedding of guidance-distilled UNets (none for others)."""
        if self.time_cond_dim is None:
            return {}
        w = torch.tensor(request.guidance_scale - 1).repeat(1)
        emb = self.pipe.get_guidance_scale_embedding(w, embedding_dim=self.time_cond_dim)
        return {"timestep_cond": emb.to(device=self.device, dtype=dtype)}

    # -- per image ---------------------------------------------------------------------------
    def new_scheduler(self, request: GenerationRequest, seed: int):
        return build_scheduler(request.scheduler, self.scheduler_config, [seed], self.scheduler_family,
                               request.timestep_spacing)

    def set_timesteps(self, scheduler, request: GenerationRequest, **kwargs: Any) -> None:
        """The pipelines' retrieve_timesteps: the request's timesteps outright, else its step count."""
        if request.timesteps is not None:
            scheduler.set_timesteps(timesteps=list(request.timesteps), device=self.device, **kwargs)
        else:
            scheduler.set_timesteps(request.num_inference_steps, device=self.device, **kwargs)

    def schedule(self, scheduler, timesteps: torch.Tensor, rows: Rows, generator: torch.Generator,
                 begin: Any = None, eta: float | None = None, span: int | None = None) -> Schedule:
        """``eta``: the request's; None, the pipelines' default 0.0."""
        kwargs: dict[str, Any] = {}
        if self.passes_step_kwargs:  # the pipeline's prepare_extra_step_kwargs
            accepted = _step_parameters(type(scheduler))
            eta = 0.0 if eta is None else eta
            kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
        return Schedule(self, rows, scheduler, timesteps, [float(t) for t in timesteps.tolist()], kwargs, begin, span)

    def plan(self, request: GenerationRequest, image_seed: int, generator: torch.Generator, rows: Rows) -> Schedule:
        """A fresh scheduler with this image's timesteps (set up as the pipeline's call does)."""
        raise NotImplementedError

    def first_step(self, steps: int, strength: float) -> int:
        """The img2img pipelines' get_timesteps: the step a start image is noised to."""
        return max(steps - min(int(steps * strength), steps), 0)

    def from_strength(self, scheduler, request: GenerationRequest) -> torch.Tensor:
        """The timesteps left to an image-input request, the scheduler set to start there."""
        start = self.first_step(request.num_inference_steps, request.strength) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return scheduler.timesteps[start:]

    def begin(self, image: ImageState, previous: torch.Tensor | None) -> torch.Tensor:
        """The latents this phase starts from: new noise, or the previous phase's latents."""
        raise NotImplementedError

    def init_noise_sigma(self, scheduler) -> float:
        return scheduler.init_noise_sigma

    def add_noise(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.add_noise(latents, noise, t)

    def encode_pixels(self, pixels: torch.Tensor, dtype: torch.dtype):
        """The VAE's latent distribution of preprocessed pixels (-1..1)."""
        return self.pipe.vae.encode(pixels.to(self.device, dtype)).latent_dist

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A preprocessed pixel mask at latent size (1 = repaint), as the inpaint pipelines resize it."""
        scale = self.pipe.vae_scale_factor
        return torch.nn.functional.interpolate(mask, size=(mask.shape[-2] // scale, mask.shape[-1] // scale))

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """A VAE sample in the denoiser's latent space."""
        return self.pipe.vae.config.scaling_factor * latents

    def noise(self, image: ImageState, dtype: torch.dtype) -> torch.Tensor:
        request = image.job.request
        scale = self.pipe.vae_scale_factor
        shape = (1, self.latent_channels, request.height // scale, request.width // scale)
        return randn_tensor(shape, generator=image.generator, device=self.device, dtype=dtype)

    def skip_layers(self, image: ImageState) -> tuple[int, ...] | None:
        """The layers a guided image's extra text row skips at its current step (SD3's skip-layer
        guidance), or None: no extra row."""
        return None

    # -- per denoiser call -------------------------------------------------------------------
    def scale(self, schedule: Schedule, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return schedule.scheduler.scale_model_input(latents, t)

    def denoiser_kwargs(self, cond: dict[str, torch.Tensor]) -> dict:
        """The denoiser's conditioning arguments from a call's concatenated rows."""
        raise NotImplementedError

    def call(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        """The denoiser over rows of several images, each with its own timestep and conditioning;
        ``extra``: the UNet's control residuals (``control.py``)."""
        raise NotImplementedError

    # -- finished images (last phase) --------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents to the VAE's image tensor (-1..1)."""
        raise NotImplementedError

    def postprocess(self, images: torch.Tensor) -> np.ndarray:
        return self.pipe.image_processor.postprocess(images, output_type="np")
