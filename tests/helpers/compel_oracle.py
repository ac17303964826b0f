"""The oracle for weighted prompts: diffusers' own pipelines called with the ``prompt_embeds`` (and
pooled, and negative) that compel itself builds for the prompt, on pipelines loaded afresh from the
model folder with the textual-inversion embeddings loaded the way diffusers documents it (into
the pipeline's own tokenizers: nothing of sdserve's private tokenizers)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from compel import Compel, CompelForSD, CompelForSDXL, DiffusersTextualInversionManager, ReturnedEmbeddingsType
from safetensors.torch import load_file

from sdserve.generation.decode import to_uint8
from sdserve.models.loading import LoadedModel
from sdserve.models.schedulers import build_scheduler
from sdserve.request.prompt_syntax import to_compel
from sdserve.request.types import GenerationRequest, RefinerMode


@functools.cache
def _pipelines(folder: Path, embeddings: Path | None):
    import diffusers

    base_dir = folder / "base" if (folder / "base").is_dir() else folder
    base = diffusers.DiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    refiner = None
    if (folder / "refiner").is_dir():
        refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder / "refiner", text_encoder_2=base.text_encoder_2, vae=base.vae)
    for path in sorted(embeddings.glob("*.safetensors")) if embeddings else []:
        state = load_file(str(path))
        if "clip_g" in state:
            base.load_textual_inversion(state["clip_l"], token=path.stem, text_encoder=base.text_encoder,
                                        tokenizer=base.tokenizer)
            base.load_textual_inversion(state["clip_g"], token=path.stem, text_encoder=base.text_encoder_2,
                                        tokenizer=base.tokenizer_2)
            if refiner is not None:
                refiner.tokenizer_2 = base.tokenizer_2
        else:
            base.load_textual_inversion(str(path), token=path.stem)
    return base, refiner


def compel_images(folder: Path, model: LoadedModel, request: GenerationRequest, embeddings: Path | None = None,
                  names=frozenset()) -> list[np.ndarray]:
    """``request``'s images (one per seed) through diffusers with compel's conditioning."""
    base, refiner = _pipelines(folder, embeddings)
    manager = DiffusersTextualInversionManager(base)
    text = functools.partial(to_compel, syntax=request.prompt_syntax, embeddings=names)
    guided = request.guidance_scale > 1
    kwargs: dict = {}
    if model.capabilities.family == "sd":
        out = CompelForSD(base, textual_inversion_manager=manager)(text(request.prompt),
                                                                  negative_prompt=text(request.negative(1)))
        kwargs.update(prompt_embeds=out.embeds, negative_prompt_embeds=out.negative_embeds)
    else:
        negative = request.negative_prompt is not None
        out = CompelForSDXL(base, textual_inversion_manager=manager)(
            text(request.prompt), style_prompt=text(request.prompt_2 or request.prompt),
            negative_prompt=text(request.negative(1)) if negative else None,
            negative_style_prompt=text(request.negative(2)) if negative else None)
        kwargs.update(prompt_embeds=out.embeds, pooled_prompt_embeds=out.pooled_embeds)
        if negative:
            kwargs.update(negative_prompt_embeds=out.negative_embeds, negative_pooled_prompt_embeds=out.negative_pooled_embeds)
    images = []
    for seed in request.seeds:
        size = {"width": request.width, "height": request.height}
        common = {"num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
                  "generator": torch.Generator("cpu").manual_seed(seed)}
        base.scheduler = build_scheduler(request.scheduler, model.scheduler_config, [seed],
                                         model.capabilities.scheduler_family)
        if request.refiner is RefinerMode.NONE or refiner is None:
            images.append(base(**size, **common, **kwargs, output_type="np").images[0])
            continue
        latents = base(**size, **common, **kwargs, denoising_end=request.high_noise_frac, output_type="latent").images
        common["generator"] = torch.Generator("cpu").manual_seed(seed)
        refiner.scheduler = build_scheduler(request.scheduler, model.refiner_scheduler_config, [seed])
        second = Compel(tokenizer=refiner.tokenizer_2, text_encoder=refiner.text_encoder_2, truncate_long_prompts=False,
                        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                        requires_pooled=True, textual_inversion_manager=manager)
        embeds, pooled = second([text(request.prompt_2 or request.prompt), text(request.negative(2))] if guided
                                else [text(request.prompt_2 or request.prompt)])
        refined = {"prompt_embeds": embeds[:1], "pooled_prompt_embeds": pooled[:1]}
        if guided:
            refined.update(negative_prompt_embeds=embeds[1:], negative_pooled_prompt_embeds=pooled[1:])
        images.append(refiner(image=latents, denoising_start=request.high_noise_frac, **common, **refined,
                              output_type="np").images[0])
    return list(to_uint8(np.stack(images)))
