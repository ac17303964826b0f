"""The oracle for control inputs: diffusers' ControlNet and T2I-Adapter pipelines made from the
loaded pipeline (``from_pipe``: the same weights, LoRA adapters included), with the control
models loaded afresh from their folders, and IP-Adapters loaded into it with ``load_ip_adapter``
(unloaded after). One call per image, each with its own generator."""

from __future__ import annotations

import numpy as np
import torch

from sdserve.generation.decode import to_uint8
from sdserve.request.types import RefinerMode


def _pipeline(model, request, controls):
    import diffusers as d

    sdxl = model.capabilities.family == "sdxl"
    nets = [c for c in request.controls if c.kind == "controlnet"]
    adapters = [c for c in request.controls if c.kind == "t2i-adapter"]
    assert not (nets and adapters), "diffusers has no pipeline with both"
    group = nets or adapters
    if not group:  # IP-Adapters alone: the model's own pipeline
        if request.image is None:
            return model.base, {}
        inputs = {"image": request.image, "strength": request.strength}
        if request.mask is not None:
            pipe = model.base if model.capabilities.needs_mask else d.AutoPipelineForInpainting.from_pipe(model.base)
            return pipe, {**inputs, "mask_image": request.mask}
        return d.AutoPipelineForImage2Image.from_pipe(model.base), inputs

    def one(values):  # a single model takes single values, several take lists
        return values[0] if len(group) == 1 else values

    def load(c):
        cls = d.ControlNetModel if c.kind == "controlnet" else d.T2IAdapter
        return cls.from_pretrained(controls.get(c.model).folder)

    if adapters:
        adapter = load(adapters[0]) if len(adapters) == 1 else d.MultiAdapter([load(c) for c in adapters])
        extra = {"image": one([c.image for c in adapters]),
                 "adapter_conditioning_scale": one([c.scale for c in adapters])}
        if sdxl:
            return d.StableDiffusionXLAdapterPipeline.from_pipe(model.base, adapter=adapter), {
                **extra, "adapter_conditioning_factor": adapters[0].end}
        assert all(c.end == 1 for c in adapters), "StableDiffusionAdapterPipeline applies adapters at every step"
        return d.StableDiffusionAdapterPipeline.from_pipe(model.base, adapter=adapter), extra
    net = load(nets[0]) if len(nets) == 1 else d.MultiControlNetModel([load(c) for c in nets])
    extra = {"controlnet_conditioning_scale": one([c.scale for c in nets]),
             "control_guidance_start": one([c.start for c in nets]), "control_guidance_end": one([c.end for c in nets])}
    if request.image is None:
        cls = d.StableDiffusionXLControlNetPipeline if sdxl else d.StableDiffusionControlNetPipeline
        return cls.from_pipe(model.base, controlnet=net), {**extra, "image": one([c.image for c in nets])}
    extra.update(image=request.image, control_image=one([c.image for c in nets]), strength=request.strength)
    if request.mask is not None:
        cls = d.StableDiffusionXLControlNetInpaintPipeline if sdxl else d.StableDiffusionControlNetInpaintPipeline
        return cls.from_pipe(model.base, controlnet=net), {**extra, "mask_image": request.mask}
    cls = d.StableDiffusionXLControlNetImg2ImgPipeline if sdxl else d.StableDiffusionControlNetImg2ImgPipeline
    return cls.from_pipe(model.base, controlnet=net), extra


@torch.inference_mode()
def control_images(model, request, kwargs: dict, size: dict, controls, scheduler) -> list[np.ndarray]:
    """``request``'s images from diffusers' control pipeline; ``kwargs``: the text-to-image
    pipeline's arguments, ``scheduler(request, config, seeds, family)`` the request's sampler."""
    from sdserve.controls.ip_adapter import weights_file

    pipe, extra = _pipeline(model, request, controls)
    ips = [c for c in request.controls if c.kind == "ip-adapter"]
    if ips:
        folders = [controls.get(c.model).folder for c in ips]
        pipe.load_ip_adapter([str(f) for f in folders], subfolder=[""] * len(ips),
                             weight_name=[weights_file(f) for f in folders], image_encoder_folder="image_encoder")
        pipe.set_ip_adapter_scale([c.scale for c in ips])
        extra["ip_adapter_image"] = [c.image for c in ips]
    try:
        images = []
        for i, seed in enumerate(request.seeds):
            call = {k: (v[i : i + 1] if isinstance(v, list) and k != "generator" else v) for k, v in kwargs.items()}
            call["generator"] = torch.Generator("cpu").manual_seed(seed)
            pipe.scheduler = scheduler(request, model.scheduler_config, [seed], model.capabilities.scheduler_family)
            if model.refiner is None or request.refiner is RefinerMode.NONE:
                images.append(pipe(**size, output_type="np", **call, **extra).images[0])
                continue
            assert request.refiner is RefinerMode.ENSEMBLE, "the refine mode is not in the control oracle"
            latents = pipe(**size, denoising_end=request.high_noise_frac, output_type="latent", **call, **extra).images
            model.refiner.scheduler = scheduler(request, model.refiner_scheduler_config, [seed], "diffusion")
            images.append(model.refiner(image=latents, denoising_start=request.high_noise_frac, output_type="np",
                                        **call).images[0])
    finally:
        if ips:
            pipe.unload_ip_adapter()
    return list(to_uint8(np.stack(images)))
