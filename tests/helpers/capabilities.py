"""Model capabilities the request tests parse against: SDXL with and without a refiner, SD 2.x
(768 px) and SD3 with its T5 encoder."""

from sdserve.models.capabilities import ModelCapabilities

SDXL = ModelCapabilities("StableDiffusionXLPipeline", 1024, 1024, 30, 5.0, family="sdxl", has_refiner=True)
SDXL_NO_REFINER = ModelCapabilities("StableDiffusionXLPipeline", 1024, 1024, 30, 5.0, family="sdxl")
SD = ModelCapabilities("StableDiffusionPipeline", 768, 768, 50, 7.5, family="sd")
SD3 = ModelCapabilities("StableDiffusion3Pipeline", 1024, 1024, 28, 7.0, family="sd3",
                        scheduler_class="FlowMatchEulerDiscreteScheduler", has_t5=True)
