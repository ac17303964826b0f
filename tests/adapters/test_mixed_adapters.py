"""Images with different LoRA adapters share denoiser calls: the base weights run once for every
row and each adapter's delta reaches only its rows, with each request's scales. Each image equals
diffusers' pipeline with ``set_adapters`` for its own adapter set alone (3/255 at the 99th
percentile), while it shares calls with images that use other adapters, none, or several. The
adapters loaded at once are bounded (least recently used out, never one an image in flight uses)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from prometheus_client import REGISTRY

from helpers.oracle import LocalEngine, diff_p99, max_diff
from sdserve.adapters import Adapters
from sdserve.tiny import write_lora

TOLERANCE = 3  # levels of 255 at the 99th percentile, against diffusers' own pipeline
BASE = {"prompt": "a lighthouse at dusk", "num_inference_steps": 4, "width": 64, "height": 64,
        "guidance_scale": 5.0}
MIXED = [  # every kind of set in one call: none, one, several, a LoCon, text encoders, negative scales
    {},
    {"loras": ["trex"]},
    {"loras": [{"name": "pixel", "scale": 0.7}], "guidance_scale": 1.0},  # one row instead of two
    {"loras": ["trex", {"name": "pixel", "scale": 0.5}]},
    {"loras": [{"name": "locon", "scale": 0.8}]},
    {"loras": [{"name": "text", "scale": 1.0}]},
    {"loras": [{"name": "pixel", "scale": -0.6}, "locon"], "num_images": 2},
]


@pytest.fixture(scope="module")
def model_dir(models, tmp_path_factory):
    """The tiny SDXL with trex and pixel (attention LoRAs), plus a LoCon (attention and
    convolutions), a DoRA and an adapter that also changes both text encoders."""
    folder = tmp_path_factory.mktemp("mixed") / "sdxl"
    shutil.copytree(models["sdxl-loras"], folder)
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    write_lora(pipeline, folder / "loras" / "locon", seed=11, targets=("to_q", "to_v", "conv1", "conv2"))
    write_lora(pipeline, folder / "loras" / "dora", seed=12, dora=True)
    write_lora(pipeline, folder / "loras" / "text", seed=13, text_encoders=True)
    return folder


def engine_with(model_dir, max_loaded=None, **settings) -> LocalEngine:
    return LocalEngine(model_dir, adapters=Adapters(model_dir / "loras", rescan_seconds=0, max_loaded=max_loaded),
                       **settings)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = engine_with(model_dir, max_batch_images=8)
    yield engine
    engine.close()


def values(i: int, extra: dict) -> dict:
    return {**BASE, "seed": 100 + i, **extra}


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_different_adapter_sets_share_every_call_and_each_image_equals_diffusers(engine):
    requests = [values(i, extra) for i, extra in enumerate(MIXED)]
    calls_with_7_sets = counter("sdserve_adapter_sets_per_call_bucket", le="8.0") - \
        counter("sdserve_adapter_sets_per_call_bucket", le="6.0")
    jobs = engine.submit(*requests)
    results = [job.future.result(120) for job in jobs]
    images = sum(len(r.images) for r in results)
    for job in jobs:  # one call held all 8 images, from 7 adapter sets, at every step
        assert job.most_images_per_call == images
    assert counter("sdserve_adapter_sets_per_call_bucket", le="8.0") - \
        counter("sdserve_adapter_sets_per_call_bucket", le="6.0") - calls_with_7_sets == BASE["num_inference_steps"]
    plain = results[0].images[0]
    for request, result in zip(requests, results):
        for ours, theirs in zip(result.images, engine.reference(request)):
            assert diff_p99(ours, theirs) <= TOLERANCE, (request, diff_p99(ours, theirs))
        if request.get("loras"):  # and the adapters did change the image
            assert max_diff(result.images[0], plain) > 2 * TOLERANCE, request


def test_an_adapter_only_peft_serves_gets_calls_of_its_own_and_the_others_still_share(engine):
    requests = [values(0, {}), values(1, {"loras": [{"name": "dora", "scale": 0.9}]}), values(2, {"loras": ["trex"]})]
    plain, dora, trex = jobs = engine.submit(*requests)
    results = [job.future.result(120).images for job in jobs]  # the references run once the engine is idle
    for job, request, (ours,) in zip(jobs, requests, results):
        (theirs,) = engine.reference(request)
        assert diff_p99(ours, theirs) <= TOLERANCE, (request.get("loras"), diff_p99(ours, theirs))
    assert dora.most_images_per_call == 1
    assert plain.most_images_per_call == trex.most_images_per_call == 2


def test_the_bound_unloads_the_least_recently_used_and_an_unloaded_adapter_comes_back(model_dir):
    engine = engine_with(model_dir, max_loaded=2, max_batch_images=4)
    try:
        resident = engine.adapters.resident
        assert len(resident.loaded) == 2  # a local folder's first adapters load at start-up, up to the bound
        evictions = counter("sdserve_lora_evictions_total")
        first = {}
        for name in ("trex", "pixel", "locon"):
            first[name] = engine.images(values(0, {"loras": [name]}))[0]
            assert len(resident.loaded) <= 2 and name in resident.loaded
        assert "trex" not in resident.loaded  # least recently used
        assert counter("sdserve_lora_evictions_total") > evictions
        again = engine.images(values(0, {"loras": ["trex"]}))[0]
        assert np.array_equal(again, first["trex"])  # loaded again from disk: the same image
        assert counter("sdserve_lora_resident") == len(resident.loaded) == 2
        # More adapters in flight than the bound: none of theirs is unloaded while their images run.
        requests = [values(i, {"loras": [name]}) for i, name in enumerate(("pixel", "locon", "trex"))]
        results = [job.future.result(120).images for job in engine.submit(*requests)]
        for request, (ours,) in zip(requests, results):
            assert diff_p99(ours, engine.reference(request)[0]) <= TOLERANCE
    finally:
        engine.close()
