"""The step-level loop against the oracle: diffusers' own ``pipeline(...)`` with the same seeds.

Every family, every sampler, both refiner modes, negative prompts and several images per request
give the image diffusers gives (within TOLERANCE levels at the 99th percentile), alone and inside
a mixed step-level batch.
"""

import json
import shutil
import threading

import numpy as np
import pytest

from helpers.oracle import TOLERANCE, LocalEngine, assert_matches, max_diff
from sdserve.models.schedulers import FLOW_SCHEDULERS, SCHEDULERS


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory):
    """One engine per model kind, and an SD copy whose scheduler predicts v (as SD 2.x 768 does)."""
    v_model = tmp_path_factory.mktemp("sd-v") / "sd"
    shutil.copytree(models["sd"], v_model)
    config = v_model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    from sdserve.models.loading import LoadOptions

    made = {kind: LocalEngine(models[kind]) for kind in ("sdxl-refiner", "sd", "sd3")}
    made["sd-v"] = LocalEngine(v_model)
    made["sd3-no-t5"] = LocalEngine(models["sd3"], load_options=LoadOptions(drop_t5=True))
    yield made
    for engine in made.values():
        engine.close()


FAMILY_CASES = [
    ("sdxl-refiner", {"refiner": "none"}),
    ("sdxl-refiner", {"refiner": "none", "negative_prompt": "blurry", "num_images": 2}),
    ("sdxl-refiner", {"refiner": "none", "guidance_scale": 1.0}),
    ("sdxl-refiner", {"refiner": "none", "prompt_2": "oil painting", "negative_prompt_2": "photo",
                      "crops_coords_top_left": [32, 0], "original_size": [512, 512]}),
    ("sd", {}),
    ("sd", {"negative_prompt": "blurry", "num_images": 2, "width": 320}),
    ("sd", {"guidance_scale": 1.0}),
    ("sd-v", {"negative_prompt": "blurry"}),
    ("sd3", {}),
    ("sd3", {"negative_prompt": "blurry", "num_images": 2, "prompt_3": "for t5"}),
    ("sd3", {"guidance_scale": 1.0, "scheduler": "Heun"}),
    ("sd3-no-t5", {"negative_prompt": "blurry"}),
]


@pytest.mark.parametrize("kind, values", FAMILY_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(FAMILY_CASES)])
def test_each_family_gives_the_diffusers_image(engines, kind, values):
    request = {"prompt": "a dog in a field", "seed": 11, "num_inference_steps": 4, **values}
    assert_matches(engines[kind].images(request), engines[kind].reference(request))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_gives_the_diffusers_image(engines, name):
    request = {"prompt": "a cat", "seed": 5, "num_inference_steps": 5, "scheduler": name, "refiner": "none",
               "negative_prompt": "ugly"}
    engine = engines["sdxl-refiner"]
    ours = engine.images(request)
    assert ours[0].std() > 5
    assert_matches(ours, engine.reference(request))


@pytest.mark.parametrize("name", sorted(FLOW_SCHEDULERS))
def test_every_flow_sampler_gives_the_diffusers_image(engines, name):
    request = {"prompt": "a cat", "seed": 5, "num_inference_steps": 4, "scheduler": name}
    assert_matches(engines["sd3"].images(request), engines["sd3"].reference(request))


@pytest.mark.parametrize("mode", ["ensemble", "refine"])
@pytest.mark.parametrize("scheduler", [None, "Heun", "DPM++ 2M SDE Karras", "Euler a"])
def test_refiner_modes_give_the_diffusers_image(engines, mode, scheduler):
    """Ensemble: the base stops at high_noise_frac, the refiner goes on; refine: it re-noises the tail.
    Heun is second order (the hand-over point is adjusted), the others draw noise per step."""
    request = {"prompt": "a cat", "seed": 8, "num_inference_steps": 8, "refiner": mode, "scheduler": scheduler,
               "negative_prompt": "ugly", "high_noise_frac": 0.7, "refiner_strength": 0.4, "num_images": 2}
    assert_matches(engines["sdxl-refiner"].images(request), engines["sdxl-refiner"].reference(request))


MIXED = [
    {"prompt": "a dog", "seed": 1, "num_inference_steps": 12, "num_images": 2},
    {"prompt": "a cat", "seed": 2, "num_inference_steps": 3, "guidance_scale": 1.0, "scheduler": "Euler a"},
    {"prompt": "a fox", "seed": 3, "num_inference_steps": 7, "guidance_scale": 9, "scheduler": "DPM++ 2M SDE Karras",
     "negative_prompt": "ugly"},
    {"prompt": "a fox", "seed": 4, "num_inference_steps": 5, "width": 128, "height": 192, "scheduler": "Heun"},
    {"prompt": "a cow", "seed": 5, "num_inference_steps": 8, "refiner": "refine", "scheduler": "DPM2 a"},
    {"prompt": "a hen", "seed": 6, "num_inference_steps": 9, "refiner": "ensemble", "scheduler": "DPM++ SDE Karras",
     "high_noise_frac": 0.6},
]


def test_a_request_in_a_mixed_step_level_batch_gives_its_image_alone(models):
    """Other steps, guidance, samplers, sizes and phases queued together, three images per call."""
    engine = LocalEngine(models["sdxl-refiner"], max_batch_images=3)
    try:
        jobs = engine.submit(*MIXED)
        results = [job.future.result(120) for job in jobs]
        assert max(r.batch_images for r in results) == 3  # calls were shared
        for values, result in zip(MIXED, results):
            assert_matches(result.images, engine.images(values))
            assert_matches(result.images, engine.reference(values))
    finally:
        engine.close()


def test_a_short_request_joins_a_running_one_at_the_next_step(engines):
    engine = engines["sdxl-refiner"]
    started = threading.Event()
    long_steps = []

    def on_long(progress):
        long_steps.append(progress.step)
        started.set()

    (long_job,) = engine.submit({"prompt": "long", "seed": 1, "num_inference_steps": 60, "refiner": "none"},
                                on_progress=on_long)
    assert started.wait(30)
    short_values = {"prompt": "short", "seed": 2, "num_inference_steps": 4, "refiner": "none"}
    (short_job,) = engine.submit(short_values)
    short = short_job.future.result(60)
    assert not long_job.future.done() and len(long_steps) < 60  # finished while the long one ran
    assert short.batch_images == 2  # it shared the long one's denoiser calls
    long_job.future.result(60)
    assert_matches(short.images, engine.images(short_values))


def test_progress_is_reported_per_image_and_step_across_phases(engines):
    events = []
    (job,) = engines["sdxl-refiner"].submit(
        {"prompt": "x", "seed": 3, "num_inference_steps": 10, "refiner": "ensemble", "num_images": 2},
        on_progress=events.append)
    job.future.result(60)
    for index in (0, 1):
        mine = [e for e in events if e.image_index == index]
        assert [e.step for e in mine] == list(range(1, mine[0].steps + 1))
        assert {e.phase for e in mine} == {"base", "refiner"} and mine[-1].phase == "refiner"
        assert tuple(mine[0].latents.shape) == (1, 4, 32, 32) and mine[0].denoised is not None


def test_same_seed_same_image_other_seed_other_image(engines):
    engine = engines["sdxl-refiner"]
    request = {"prompt": "a dog", "seed": 42, "num_inference_steps": 4}
    first, again = engine.images(request)[0], engine.images(request)[0]
    assert first.shape == (256, 256, 3) and np.array_equal(first, again)
    assert max_diff(first, engine.images({**request, "seed": 43})[0]) > 50
    # image i of a request is the image a one-image request with seed + i makes
    pair = engine.images({**request, "num_images": 2})
    assert max_diff(pair[1], engine.images({**request, "seed": 43})[0]) <= TOLERANCE


def test_refiner_modes_and_micro_conditioning_change_the_image(engines):
    engine = engines["sdxl-refiner"]
    common = {"prompt": "a dog", "seed": 9, "num_inference_steps": 10}
    none, ensemble, refine = (engine.images({**common, "refiner": m})[0] for m in ("none", "ensemble", "refine"))
    for a, b in [(none, ensemble), (none, refine), (ensemble, refine)]:
        assert max_diff(a, b) > 2 * TOLERANCE
    cropped = engine.images({**common, "refiner": "none", "crops_coords_top_left": [256, 0]})[0]
    assert max_diff(none, cropped) > 0


def test_images_of_different_sizes_take_turns(engines):
    """Two groups (latent sizes) cannot share a call: they alternate step by step."""
    order = []
    engine = engines["sd"]
    with engine.engine.queue.cond:  # admitted at the same step boundary
        jobs = [engine.submit({"prompt": label, "seed": 1, "num_inference_steps": 6, "width": width, "height": 128},
                              on_progress=lambda p, label=label: order.append(label))[0]
                for label, width in (("a", 128), ("b", 192))]
    results = [job.future.result(60) for job in jobs]
    assert [r.batch_images for r in results] == [1, 1]
    assert order == ["a", "b"] * 6
    assert results[0].images[0].shape == (128, 128, 3) and results[1].images[0].shape == (128, 192, 3)


def test_out_of_memory_retries_in_halves_then_names_the_size(models):
    from sdserve.errors import ImageTooLarge
    from sdserve.generation.faults import Faults

    # denoiser calls of more than two 128x128 images "run out of memory"
    engine = LocalEngine(models["sdxl"], faults=Faults(oom_pixels=2 * 128 * 128))
    try:
        request = {"prompt": "x", "seed": 3, "num_images": 5, "num_inference_steps": 2, "width": 128, "height": 128}
        assert_matches(engine.images(request), engine.reference(request))
        with pytest.raises(ImageTooLarge, match="out of accelerator memory generating one 256x256 image"):
            engine.images({"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 2})
        assert engine.images({"prompt": "after", "width": 64, "height": 64, "num_inference_steps": 2})
    finally:
        engine.close()


def test_counting_tokens_on_another_thread_does_not_disturb_generation(engines):
    """Fast tokenizers keep truncation/padding state per object: counting must use copies."""
    from sdserve.request.prompts import counting_tokenizers, prompt_report

    engine = engines["sdxl-refiner"]
    base = engine.model.base
    tokenizers = counting_tokenizers({"tokenizer": base.tokenizer, "tokenizer_2": base.tokenizer_2})
    long_request = engine.parse({"prompt": "word " * 200})
    stop = threading.Event()

    def count_forever():
        while not stop.is_set():
            assert prompt_report(tokenizers, tokenizers, long_request, 300).warnings

    counter = threading.Thread(target=count_forever)
    counter.start()
    try:
        for seed in range(4):
            engine.images({"prompt": "a short prompt", "num_inference_steps": 1, "refiner": "none", "seed": seed})
    finally:
        stop.set()
        counter.join()


def test_vae_tiling_decodes_large_images(models):
    from sdserve.models.loading import LoadOptions

    engine = LocalEngine(models["sd"], load_options=LoadOptions(vae_tiling=True, vae_slicing=True))
    try:
        assert engine.model.base.vae.use_tiling and engine.model.base.vae.use_slicing
        images = engine.images({"prompt": "x", "width": 1024, "height": 512, "num_images": 2, "num_inference_steps": 2})
        assert [i.shape for i in images] == [(512, 1024, 3)] * 2 and images[0].std() > 5
    finally:
        engine.close()


def test_memoised_lms_steps_exactly_as_diffusers_lms(models):
    import diffusers
    import torch

    from sdserve.models.schedulers import MemoisedLMSDiscreteScheduler, build_scheduler

    config = json.loads((models["sdxl"] / "scheduler" / "scheduler_config.json").read_text())
    first, second = build_scheduler("LMS Karras", config), build_scheduler("LMS Karras", config)
    plain = diffusers.LMSDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    assert isinstance(second, MemoisedLMSDiscreteScheduler) and not isinstance(plain, MemoisedLMSDiscreteScheduler)

    def run(scheduler):  # the second memoised run takes every coefficient from the first's
        scheduler.set_timesteps(12)
        noise, x = torch.Generator().manual_seed(0), torch.ones(1, 4, 8, 8)
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            x = scheduler.step(torch.randn(x.shape, generator=noise), t, x).prev_sample
        return x

    run(first)
    assert torch.equal(run(second), run(plain))
