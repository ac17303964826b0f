"""FLUX.1 ([dev], [schnell], Fill) and SD3.5 in the step loop against the oracle: FluxPipeline,
FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline and StableDiffusion3Pipeline give the
same images for the same seeds, alone and while FLUX requests of other steps, guidance, true CFG,
image inputs and LoRA adapters share the transformer's calls."""

import numpy as np
import pytest
from kserve.errors import InvalidInput

from helpers.flux_loras import write_kohya_flux_lora
from helpers.images import b64_image, make_image, make_mask
from helpers.oracle import TOLERANCE, LocalEngine, assert_matches, diff_p99, max_diff
from helpers.savings_oracle import first_block_cache_images
from sdserve.tiny import write_tiny_model

SIZE = {"width": 128, "height": 128}  # the tiny models' transformers are cheap there; 1024 is the default
IMAGE = b64_image(make_image(128, 128))
MASK = b64_image(make_mask(128, 128))


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory):
    from sdserve.adapters import Adapters

    made = {kind: LocalEngine(models[kind]) for kind in ("flux", "flux-schnell", "flux-fill", "sd35")}
    # the same FLUX weights with a diffusers-format LoRA and a kohya-format one
    folder = write_tiny_model(tmp_path_factory.mktemp("flux-loras") / "flux", "flux", loras=("painted",))
    write_kohya_flux_lora(made["flux"].model.base.transformer, folder / "loras" / "kohya", seed=9)
    made["flux-loras"] = LocalEngine(folder, adapters=Adapters(folder / "loras", rescan_seconds=0))
    yield made
    for engine in made.values():
        engine.close()


CASES = [
    ("flux", {}),
    ("flux", {"guidance_scale": 5.0, "prompt_2": "for t5", "num_images": 2}),
    ("flux", {"true_cfg_scale": 4.0, "negative_prompt": "blurry", "negative_prompt_2": "noise"}),
    ("flux", {"width": 192, "height": 128, "num_inference_steps": 3}),
    ("flux-schnell", {"num_inference_steps": 4}),
    ("flux-schnell", {"true_cfg_scale": 2.0, "negative_prompt": "blurry"}),
    ("sd35", {}),
    ("sd35", {"negative_prompt": "blurry", "num_images": 2, "prompt_3": "for t5"}),
]


@pytest.mark.parametrize("kind, values", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_each_request_gives_the_diffusers_image(engines, kind, values):
    request = {"prompt": "a lighthouse at dusk", "seed": 3, "num_inference_steps": 5, **SIZE, **values}
    ours = engines[kind].images(request)
    assert all(image.std() > 5 for image in ours)
    assert_matches(ours, engines[kind].reference(request))


def test_flux_requests_of_other_steps_guidance_and_inputs_share_calls(engines):
    """Text, true CFG (two rows), img2img and inpainting at one latent size: one call per step."""
    engine = engines["flux"]
    requests = [{"prompt": "a fox", "seed": 1, "num_inference_steps": 6, **SIZE},
                {"prompt": "a fox", "seed": 2, "num_inference_steps": 4, "guidance_scale": 7.0, **SIZE},
                {"prompt": "a cat", "seed": 3, "num_inference_steps": 5, "true_cfg_scale": 3.0,
                 "negative_prompt": "dark", **SIZE},
                {"prompt": "a boat", "seed": 4, "num_inference_steps": 6, "image": IMAGE, "strength": 0.7, **SIZE},
                {"prompt": "a boat", "seed": 5, "num_inference_steps": 5, "image": IMAGE, "mask": MASK, **SIZE}]
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images for job in jobs]
    for values, ours in zip(requests, results):
        assert_matches(ours, engine.reference(values))
    assert max(job.most_images_per_call for job in jobs) == len(requests)
    assert max_diff(results[0][0], results[1][0]) > 2 * TOLERANCE


@pytest.mark.parametrize("values", [{"mask": MASK}, {"mask": MASK, "strength": 0.7, "num_images": 2},
                                    {"mask": MASK, "guidance_scale": 10.0, "num_inference_steps": 3}])
def test_flux_fill_gives_the_fill_pipelines_image(engines, values):
    """FLUX.1 Fill reads the mask folded into 64 channels and the masked image's latents."""
    request = {"prompt": "a red door", "image": IMAGE, "seed": 7, "num_inference_steps": 4, **SIZE, **values}
    engine = engines["flux-fill"]
    assert_matches(engine.images(request), engine.reference(request))


def test_flux_loras_in_diffusers_and_kohya_formats_mixed_in_one_call(engines):
    engine = engines["flux-loras"]
    common = {"prompt": "a castle", "num_inference_steps": 4, **SIZE}
    requests = [{**common, "seed": 1}, {**common, "seed": 1, "loras": ["painted"]},
                {**common, "seed": 1, "loras": [{"name": "kohya", "scale": 0.8}]},
                {**common, "seed": 2, "loras": ["painted", {"name": "kohya", "scale": 0.5}]}]
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images[0] for job in jobs]
    for values, ours in zip(requests, results):
        assert_matches([ours], engine.reference(values))
    plain, painted, kohya = results[:3]
    assert max_diff(plain, painted) > 2 * TOLERANCE and max_diff(plain, kohya) > 2 * TOLERANCE
    assert max(job.most_images_per_call for job in jobs) == 4
    alone = {**common, "seed": 1}  # with adapters resident, a request with none is exactly the bare model's
    assert np.array_equal(engine.images(alone)[0], engines["flux"].images(alone)[0])


def test_flux_first_block_cache_equals_diffusers_hook_beside_a_plain_request(engines):
    engine = engines["flux"]
    common = {"prompt": "a lighthouse", "num_inference_steps": 10, **SIZE}
    for threshold in (0.6, 1e-6):  # skips some steps; skips none (then: the plain image)
        cached = {**common, "cache": "first_block", "cache_threshold": threshold, "seed": 9}
        jobs = engine.submit(cached, {**common, "seed": 10, "guidance_scale": 5.0})
        ours, plain = (job.future.result(120).images[0] for job in jobs)
        (theirs,) = first_block_cache_images(engine.model, engine.parse(cached))
        assert diff_p99(ours, theirs) <= TOLERANCE, (threshold, diff_p99(ours, theirs))
        assert ("cached" in jobs[0].cache_logs[0]) == (threshold > 0.01), jobs[0].cache_logs[0]
        assert jobs[0].most_images_per_call == 2
        assert_matches([plain], engine.reference({**common, "seed": 10, "guidance_scale": 5.0}))
    assert diff_p99(ours, engine.images({**common, "seed": 9})[0]) <= TOLERANCE


def test_sd35_skip_layer_guidance_among_other_requests(engines):
    """SD3.5's skip-layer guidance (an extra text row without some layers, one call per layer set)."""
    engine = engines["sd35"]
    common = {"prompt": "a lighthouse", "num_inference_steps": 8, **SIZE}
    requests = [{**common, "seed": 1, "skip_guidance_layers": [7, 8, 9], "skip_layer_guidance_stop": 0.6},
                {**common, "seed": 2, "skip_guidance_layers": [1, 4], "skip_layer_guidance_scale": 2.0,
                 "skip_layer_guidance_start": 0.2, "skip_layer_guidance_stop": 0.9, "num_inference_steps": 6,
                 "negative_prompt": "fog"},
                {**common, "seed": 1}]
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images for job in jobs]
    for values, ours in zip(requests, results):
        assert_matches(ours, engine.reference(values))
    assert max_diff(results[0][0], results[2][0]) > 2 * TOLERANCE
    assert engine.parse(requests[0]).describe()["skip_guidance_layers"] == [7, 8, 9]


REFUSED = [
    ("flux", {"negative_prompt": "blurry"}, "negative_prompt: FLUX reads a negative prompt only with true CFG"),
    ("flux", {"negative_prompt_2": "blurry", "true_cfg_scale": 1.0}, "negative_prompt_2: FLUX reads a negative"),
    ("flux", {"true_cfg_scale": 3.0}, "true_cfg_scale: true CFG needs a negative_prompt"),
    ("flux", {"scheduler": "Heun"}, "scheduler: FLUX's schedule"),
    ("flux", {"prompt_3": "x"}, "prompt_3"),
    ("flux", {"refiner": "ensemble"}, "refiner"),
    ("flux", {"timesteps": [999, 500]}, "timesteps"),
    ("flux", {"width": 136}, "width"),
    ("flux-schnell", {"guidance_scale": 3.5}, "guidance_scale: this FLUX model (FluxPipeline, like FLUX.1 [schnell])"),
    ("flux-fill", {"image": IMAGE}, "mask"),
    ("flux-fill", {"image": IMAGE, "mask": MASK, "true_cfg_scale": 2.0, "negative_prompt": "x"}, "true_cfg_scale"),
    ("sd35", {"true_cfg_scale": 2.0}, "true_cfg_scale"),
    ("sd35", {"skip_guidance_layers": [10]}, "skip_guidance_layers: .* from 0 to 9"),
    ("sd35", {"skip_guidance_layers": [1], "guidance_scale": 1.0}, "skip_guidance_layers: .* needs guidance_scale"),
    ("sd35", {"skip_guidance_layers": [1], "image": IMAGE}, "skip_guidance_layers: skip-layer guidance is for text"),
    ("sd35", {"skip_guidance_layers": [1], "cache": "first_block"}, "skip_guidance_layers: not with cache first_block"),
    ("sd35", {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.5}, "skip_layer_guidance_start: must be"),
    ("sd35", {"skip_layer_guidance_scale": 3.0}, "skip_layer_guidance_scale: applies with skip_guidance_layers"),
    ("flux", {"skip_guidance_layers": [0]}, "skip_guidance_layers: only SD3 models"),
    ("flux", {"cache": "deep"}, "cache: deep is for UNet models .*; this model takes cache first_block"),
    ("flux", {"cache": "first_block", "true_cfg_scale": 2.0, "negative_prompt": "x"}, "true_cfg_scale: not with cache"),
]


@pytest.mark.parametrize("kind, values, message", REFUSED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(REFUSED)])
def test_fields_the_family_would_ignore_are_refused_by_name(engines, kind, values, message):
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        engines[kind].parse({"prompt": "a fox", **values})


def test_flux_cannot_drop_t5(models):
    import torch

    from sdserve.models.layout import ModelStoreError, discover
    from sdserve.models.loading import LoadOptions, load

    with pytest.raises(ModelStoreError, match="--drop_t5: FLUX reads its prompt through T5"):
        load(discover(models["flux"]), torch.device("cpu"), torch.float32, options=LoadOptions(drop_t5=True))


def test_capabilities_say_what_each_flux_model_takes(engines):
    dev, schnell, fill = (engines[k].model.capabilities for k in ("flux", "flux-schnell", "flux-fill"))
    assert (dev.family, dev.default_width, dev.size_multiple, dev.guidance_embedded) == ("flux", 1024, 16, True)
    assert dev.default_guidance_scale == 3.5 and dev.scheduler_family == "flow"
    assert not schnell.guidance_embedded and (schnell.default_steps, schnell.default_guidance_scale) == (4, 0.0)
    assert fill.needs_mask and fill.default_guidance_scale == 30.0 and fill.pipeline_class == "FluxFillPipeline"
