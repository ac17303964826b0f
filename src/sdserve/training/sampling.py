"""Images from sdserve's own engine, for class images and validation images: requests parsed and
validated by the server's parser and denoised by the engine's step loop, on the model being trained
(its LoRA layers included), never through the pipeline's ``__call__``."""

from __future__ import annotations

import torch
from PIL import Image

from ..generation import Job, ModelBackend
from ..generation.loop import StepLoop
from ..models.loading import LoadedModel
from ..request.types import Limits
from ..request.validation import RequestParser


class EngineImages:
    def __init__(self, loaded: LoadedModel):
        self.limits = Limits()
        self.parser = RequestParser(self.limits, loaded.capabilities)
        self.loop = StepLoop(ModelBackend(loaded), self.limits.max_images)
        self.modules = [m for m in loaded.base.components.values() if isinstance(m, torch.nn.Module)]

    def generate(self, prompt: str, size: int, steps: int, seed: int, count: int = 1) -> list[Image.Image]:
        """``count`` images of ``prompt``; image i has seed ``seed + i``, as server requests number them."""
        images: list[Image.Image] = []
        modes = [m.training for m in self.modules]
        # as servers run it: no LoRA dropout, and without the forward that accelerate's mixed
        # precision wraps in autocast and whose outputs it turns to float32
        wrapped = {m: m.forward for m in self.modules if "_original_forward" in vars(m)}
        for module in wrapped:
            module.forward = module._original_forward
        for module in self.modules:
            module.eval()
        try:
            while len(images) < count:
                n = min(self.limits.max_images, count - len(images))
                request = self.parser.parse({"prompt": prompt, "width": size, "height": size, "num_images": n,
                                             "num_inference_steps": steps, "seed": seed + len(images)})
                job = Job(request, "sdserve-train")
                self.loop.run_to_completion([job])
                images += [Image.fromarray(array) for array in job.future.result(0).images]
        finally:
            for module, mode in zip(self.modules, modes):
                module.train(mode)
            for module, forward in wrapped.items():
                module.forward = forward
        return images
