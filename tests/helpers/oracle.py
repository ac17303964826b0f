"""The oracle: images from diffusers' own ``pipeline(...)`` calls, for the same request and seeds.

This is how runtimes call diffusers (and how sdserve did before it ran the loop itself): one
pipeline call for the base, one for the refiner, a ``torch.Generator`` per image and a fresh
scheduler per call. sdserve's step-level engine must give the same images.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from sdserve.generation.decode import to_uint8
from sdserve.models.loading import LoadedModel
from sdserve.models.schedulers import build_scheduler
from sdserve.request.types import GenerationRequest, RefinerMode

# Different batch compositions may round differently in batched kernels; images must stay within
# this many levels of 255 at the 99th percentile of pixels.
TOLERANCE = 2


def diff_p99(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.percentile(np.abs(a.astype(int) - b.astype(int)), 99))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def assert_matches(ours: list[np.ndarray], reference: list[np.ndarray]) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape and a.dtype == np.uint8
        assert diff_p99(a, b) <= TOLERANCE, (diff_p99(a, b), max_diff(a, b))


@torch.inference_mode()  # as the engine's worker loaded the adapters
def diffusers_images(model: LoadedModel, request: GenerationRequest, adapters=None, controls=None) -> list[np.ndarray]:
    """``request``'s images from the pipelines' own __call__ (one call for all its images), with
    its LoRA adapters set as diffusers users set them (``set_adapters`` with the same scales) and
    its control models (from the ``controls`` catalog) in diffusers' control pipelines."""
    resident = adapters.resident if adapters is not None else None
    if resident is None or not resident.loaded and not request.loras:
        return _diffusers_images(model, request, controls)
    resident.ensure({name for name, _ in request.loras}, set())  # loaded (again, if the engine unloaded it)
    base = model.base
    if request.loras:
        base.enable_lora()
        base.set_adapters([name for name, _ in request.loras], adapter_weights=[s for _, s in request.loras])
    else:
        base.disable_lora()
    try:
        return _diffusers_images(model, request, controls)
    finally:
        resident.batched.refresh()  # the engine's own state again: the denoiser's peft layers off


@torch.inference_mode()
def _diffusers_images(model: LoadedModel, request: GenerationRequest, controls=None) -> list[np.ndarray]:
    seeds = request.seeds
    has_negative = request.negative_prompt is not None
    n = request.num_images
    kwargs = {
        "prompt": [request.prompt] * n,
        "negative_prompt": [request.negative(1)] * n if has_negative else None,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
    }
    family = model.capabilities.family
    if family in ("sdxl", "sd3", "flux"):
        kwargs["prompt_2"] = [request.prompt_2 or request.prompt] * n
        kwargs["negative_prompt_2"] = [request.negative(2)] * n if has_negative else None
    if request.true_cfg_scale != 1.0:  # FLUX's true CFG
        kwargs["true_cfg_scale"] = request.true_cfg_scale
    if request.skip_guidance_layers is not None:  # SD3's skip-layer guidance
        kwargs.update(skip_guidance_layers=list(request.skip_guidance_layers),
                      skip_layer_guidance_scale=request.skip_layer_guidance_scale,
                      skip_layer_guidance_start=request.skip_layer_guidance_start,
                      skip_layer_guidance_stop=request.skip_layer_guidance_stop)
    if family == "sd3":
        kwargs["prompt_3"] = [request.prompt_3 or request.prompt] * n
        kwargs["negative_prompt_3"] = [request.negative(3)] * n if has_negative else None
    if request.eta is not None:  # the sampler settings, as a diffusers user passes them
        kwargs["eta"] = request.eta
    if family == "sdxl":
        kwargs.update(original_size=request.original_size, crops_coords_top_left=request.crops_coords_top_left or (0, 0),
                      target_size=request.target_size)
    base = model.base
    size = {"height": request.height, "width": request.width}
    if request.controls:
        from helpers.control_oracle import control_images

        return control_images(model, request, kwargs, size, controls, _scheduler)
    if request.image is not None:
        return _from_image(model, request, kwargs, size)
    if request.timesteps is not None:  # text-to-image on the base only (validation.py)
        kwargs["timesteps"] = list(request.timesteps)
    base.scheduler = _scheduler(request, model.scheduler_config, seeds, model.capabilities.scheduler_family)
    mode = request.refiner if model.refiner is not None else RefinerMode.NONE
    if mode is RefinerMode.NONE:
        return list(to_uint8(base(**size, output_type="np", **kwargs).images))
    refiner = model.refiner
    refiner.scheduler = _scheduler(request, model.refiner_scheduler_config, seeds)
    if mode is RefinerMode.ENSEMBLE:
        latents = base(**size, denoising_end=request.high_noise_frac, output_type="latent", **kwargs).images
        images = refiner(image=latents, denoising_start=request.high_noise_frac, output_type="np", **kwargs).images
    else:
        latents = base(**size, output_type="latent", **kwargs).images
        images = refiner(image=latents, strength=request.refiner_strength, output_type="np", **kwargs).images
    return list(to_uint8(images))


def _scheduler(request: GenerationRequest, config: dict, seeds: list[int], family: str = "diffusion"):
    """The request's sampler from the model's config; a timestep_spacing set as diffusers users set
    it, ``Cls.from_config(config, timestep_spacing=...)``."""
    scheduler = build_scheduler(request.scheduler, config, seeds, family)
    if request.timestep_spacing is None:
        return scheduler
    spaced = type(scheduler).from_config(scheduler.config, timestep_spacing=request.timestep_spacing)
    if hasattr(scheduler, "noise_sampler_seed"):  # an attribute, not kept by the config
        spaced.noise_sampler_seed = scheduler.noise_sampler_seed
    return spaced


def _from_image(model: LoadedModel, request: GenerationRequest, kwargs: dict, size: dict) -> list[np.ndarray]:
    """An image-input request as diffusers runs it: AutoPipelineForImage2Image/-Inpainting made
    from the loaded pipeline (or the loaded inpainting / refiner pipeline itself), one call per
    image so each has its own generator throughout (the inpaint pipelines encode the start image
    with the first generator of a list only)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    caps = model.capabilities
    base = model.base
    if request.mask is not None:
        pipe = base if caps.needs_mask else AutoPipelineForInpainting.from_pipe(base)
        inputs = {"image": request.image, "mask_image": request.mask, **size}
    else:
        pipe = base if caps.needs_image else AutoPipelineForImage2Image.from_pipe(base)
        inputs = {"image": request.image}
        if "height" in inspect.signature(type(pipe).__call__).parameters:  # SD3's: else its default size
            inputs.update(size)
    mode = request.refiner if model.refiner is not None else RefinerMode.NONE
    images = []
    for i, seed in enumerate(request.seeds):
        one = {k: (v[i : i + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}
        one["generator"] = torch.Generator("cpu").manual_seed(seed)
        pipe.scheduler = _scheduler(request, model.scheduler_config, [seed], caps.scheduler_family)
        call = _accepted(pipe, {**one, **inputs, "strength": request.strength})
        if mode is RefinerMode.NONE and caps.family == "sd3" and request.mask is not None:
            images.append(_sd3_decode(pipe, pipe(output_type="latent", **call).images))
            continue
        if mode is RefinerMode.NONE:
            images.append(pipe(output_type="np", **call).images[0])
            continue
        refiner = model.refiner
        refiner.scheduler = _scheduler(request, model.refiner_scheduler_config, [seed])
        if mode is RefinerMode.ENSEMBLE:
            latents = pipe(denoising_end=request.high_noise_frac, output_type="latent", **call).images
            out = refiner(image=latents, denoising_start=request.high_noise_frac, output_type="np", **one)
        else:
            latents = pipe(output_type="latent", **call).images
            out = refiner(image=latents, strength=request.refiner_strength, output_type="np", **one)
        images.append(out.images[0])
    return list(to_uint8(np.stack(images)))


def _accepted(pipe, kwargs: dict) -> dict:
    """``kwargs`` less the unset ones ``pipe`` does not take (FluxFillPipeline has no negative prompt)."""
    takes = inspect.signature(type(pipe).__call__).parameters
    return {k: v for k, v in kwargs.items() if k in takes or v is not None}


def _sd3_decode(pipe, latents) -> np.ndarray:
    """SD3's decode as its text-to-image and img2img pipelines do it. diffusers' SD3 inpaint
    pipeline leaves out the VAE's shift_factor when decoding (huggingface/diffusers#13611, issue 1;
    its own encode applies it); sdserve decodes every SD3 image the same, correct way."""
    vae = pipe.vae
    image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")[0]


class LocalEngine:
    """A model loaded through the model store and served by a real Engine, whose worker thread
    loads (and optimises) it as the server's does."""

    def __init__(self, path, max_batch_images: int = 8, adapters=None, faults=None, load_options=None,
                 optimizations=None, embeddings_dir=None, control_dir=None, max_loaded_controls=8, **settings):
        from sdserve.generation import Engine, EngineSettings

        self.adapters = adapters
        self.control_dir, self.controls, self.max_loaded_controls = control_dir, None, max_loaded_controls
        self.engine = Engine(EngineSettings(max_batch_images=max_batch_images, **settings))
        self.engine.start(lambda: self._prepare(path, faults, load_options, optimizations, embeddings_dir)).result()

    def _prepare(self, path, faults, load_options, optimizations, embeddings_dir):
        from sdserve.generation import ModelBackend
        from sdserve.models import loading, optimize
        from sdserve.models.embeddings import load_embeddings
        from sdserve.models.layout import discover
        from sdserve.request.prompt_syntax import PromptSettings
        from sdserve.request.types import Limits
        from sdserve.request.validation import RequestParser

        options = load_options or loading.LoadOptions()
        self.model = loading.load(discover(path), torch.device("cpu"), torch.float32, options=options)
        if self.adapters is not None:
            self.adapters.load_all(self.model.base)
        if optimizations is not None:
            optimize.apply(self.model.base, optimizations)
            if self.model.refiner is not None:
                optimize.apply(self.model.refiner, optimizations, include_vae=False)
        self.vocabulary = load_embeddings(self.model.base, embeddings_dir)
        loaded = None
        if self.control_dir is not None:
            from sdserve.controls import ControlCatalog, LoadedControls

            self.controls = ControlCatalog(self.control_dir, self.model.base.unet, relist_seconds=0)
            loaded = LoadedControls(self.controls, torch.device("cpu"), torch.float32, self.model.base.unet,
                                    self.max_loaded_controls)
        self.parser = RequestParser(Limits(), self.model.capabilities, self.adapters,
                                    PromptSettings(embeddings=self.vocabulary.names), controls=self.controls)
        compiled = "none" if optimizations is None else optimizations.compile
        return ModelBackend(self.model, self.adapters, faults, pad_rows=compiled != "none", pad_decode=compiled == "all",
                            vocabulary=self.vocabulary, controls=loaded)

    def parse(self, values: dict) -> GenerationRequest:
        return self.parser.parse(values)

    def submit(self, *values: dict, on_progress=None):
        """Jobs for requests submitted together (admitted at the same step boundary)."""
        return self.engine.submit([self.parse(v) for v in values], "test", on_progress=on_progress)

    def images(self, values: dict, timeout: float = 60) -> list[np.ndarray]:
        (job,) = self.submit(values)
        return job.future.result(timeout).images

    def reference(self, values: dict) -> list[np.ndarray]:
        """The same request through diffusers' pipelines (called while the engine is idle)."""
        return diffusers_images(self.model, self.parse(values), self.adapters, self.controls)

    def close(self) -> None:
        self.engine.stop(timeout=10)
