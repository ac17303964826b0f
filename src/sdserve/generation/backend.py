"""The loaded model as the step loop drives it: its phases, how its LoRA adapters and control
models apply to a call, and the admission of new images (adapters loaded, prompt encoding in batches, a scheduler
and starting latents per image)."""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict

import torch

from ..adapters.library import Adapters
from ..controls import LoadedControls
from ..models.embeddings import PromptVocabulary
from ..models.loading import LoadedModel
from ..request.types import GenerationRequest, RefinerMode
from . import control
from .admission import Job
from .families import BY_FAMILY, Phase, SDXLRefinerPhase
from .faults import Faults
from .image_start import begin_from_image, encode_start
from .state import FeatureCache, ImageState, Rows


class ModelBackend:
    """Owned by the worker thread, like the pipelines it wraps."""

    def __init__(self, model: LoadedModel, adapters: Adapters | None = None, faults: Faults | None = None,
                 pad_rows: bool = False, pad_decode: bool = False, vocabulary: PromptVocabulary | None = None,
                 controls: LoadedControls | None = None):
        self.model = model
        self.adapters = adapters
        self.controls = controls  # ControlNets, T2I-Adapters and IP-Adapters, loaded on first use
        self.resident = adapters.resident if adapters is not None else None  # loaded by Adapters.load_all
        self.faults = faults or Faults.from_env()
        # Compiled models are specialised to shapes: calls are padded to a few batch sizes.
        self.pad_rows = pad_rows  # the denoiser is compiled
        self.pad_decode = pad_decode  # the VAE decoder is compiled
        caps = model.capabilities
        # An SDXL refiner served alone is the only phase: image-to-image from the request's image.
        base_phase = SDXLRefinerPhase if caps.needs_image else BY_FAMILY[caps.family]
        self.base: Phase = base_phase(model.base, model.scheduler_config, caps.scheduler_family)
        self.refiner = (SDXLRefinerPhase(model.refiner, model.refiner_scheduler_config)
                        if model.refiner is not None else None)
        # Weighted prompts read with the private tokenizers (embeddings' tokens); the refiner's second
        # encoder is the base's, and so is its tokenizer's vocabulary.
        if vocabulary is not None:
            self.base.vocabulary = vocabulary
            if self.refiner is not None:
                self.refiner.vocabulary = PromptVocabulary(
                    {k: v for k, v in vocabulary.tokenizers.items() if k == "tokenizer_2"}, vocabulary.names)
        self._order = itertools.count()

    def phases(self, request: GenerationRequest) -> list[Phase]:
        if self.refiner is None or request.refiner is RefinerMode.NONE:
            return [self.base]
        return [self.base, self.refiner]

    def adapter_scope(self, phase: Phase, row_images: list[ImageState]) -> contextlib.AbstractContextManager:
        """What applies the LoRA adapters of each row's image during one call of ``phase``."""
        if self.resident is None or not phase.uses_adapters:
            return contextlib.nullcontext()
        return self.resident.for_call([im.job.request.loras for im in row_images], phase.device)

    def control_scope(self, phase: Phase, row_images: list[ImageState], latents: torch.Tensor, t: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        """Where one call of the base phase gets its rows' control inputs (none for the others)."""
        if phase is not self.base or not any(im.controls is not None for im in row_images):
            return contextlib.nullcontext({})
        return control.control_call(phase, row_images, latents, t, cond, self.controls)

    def admit(self, jobs: list[Job], in_use: frozenset[str] = frozenset()) -> list[ImageState]:
        """Image states for ``jobs``: their adapters loaded (none that ``in_use``, the adapters of
        images in flight, holds is unloaded to make room), prompts encoded once per request and
        phase, batched across requests that agree on guidance, whether a negative prompt was given
        and the adapters that change the text encoders."""
        if self.resident is not None:
            self.resident.ensure({name for job in jobs for name, _ in job.request.loras}, in_use)
        batches: dict[tuple, list[Job]] = defaultdict(list)
        for job in jobs:
            r = job.request
            text_loras = self.resident.text_encoder_adapters(r.loras) if self.resident is not None else ()
            for phase in self.phases(r):  # (a refiner shares the base's second text encoder)
                batches[(phase, text_loras, phase.guided(r), r.negative_prompt is None)].append(job)
        rows: dict[tuple[int, str], Rows] = {}
        for (phase, text_loras, guided, _), members in batches.items():
            if self.resident is not None:
                self.resident.for_text_encoders(text_loras)
            for job, job_rows in zip(members, phase.encode([j.request for j in members], guided)):
                rows[id(job), phase.name] = job_rows
        images = []
        for job in jobs:
            request, phases = job.request, self.phases(job.request)
            job.images = [None] * request.num_images
            job.cache_logs = [[] for _ in range(request.num_images)]
            dtype = rows[id(job), self.base.name].cond["encoder_hidden_states"].dtype
            start = encode_start(self.base, request, dtype) if request.image is not None else None
            # adapters the batched path cannot serve: calls of their own (the policy's group key)
            own_calls = request.loras if self.resident is not None and self.resident.exclusive(request.loras) else ()
            for index, seed in enumerate(request.seeds):
                # A CPU generator: the same seed gives the same noise on any device.
                generator = torch.Generator("cpu").manual_seed(seed)
                schedules = [p.plan(request, seed, generator, rows[id(job), p.name]) for p in phases]
                image = ImageState(job, index, seed, generator, schedules, sum(len(s.times) for s in schedules),
                                   next(self._order), own_calls=own_calls,
                                   cache=FeatureCache(request.cache, request.cache_interval, request.cache_threshold,
                                                      ran=job.cache_logs[index]) if request.cache != "none" else None)
                if start is None:
                    image.latents = self.base.begin(image, None)
                else:
                    image.latents = begin_from_image(self.base, image, start, dtype)
                images.append(image)
            if request.controls:  # the same for every image of the request
                job_images = images[-request.num_images:]
                schedule = job_images[0].schedules[0]
                prepared = control.prepare(request.controls, request, self.controls, self.base.pipe.vae_scale_factor,
                                           self.base.device, schedule.span or len(schedule.times))
                for image in job_images:
                    image.controls = prepared
        return images
