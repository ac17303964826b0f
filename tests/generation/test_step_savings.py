"""Fewer denoiser FLOPs per image, inside shared calls: guidance only within an interval of the
schedule (diffusers with the dynamic-CFG callback switching it at the same steps is the oracle),
DeepCache for UNet models and First Block Cache for SD3 (diffusers' own hook is the oracle), the
rows each request saved, and what ran for each image at each step."""

from __future__ import annotations

import numpy as np
import pytest
from kserve.errors import InvalidInput

from helpers.oracle import LocalEngine, diff_p99, max_diff
from helpers.savings_oracle import first_block_cache_images, interval_images

TOLERANCE = 3
COMMON = {"prompt": "a lighthouse", "num_inference_steps": 10, "width": 64, "height": 64, "guidance_scale": 6.0}


@pytest.fixture(scope="module")
def engines(models):
    built = {kind: LocalEngine(models[kind], max_batch_images=8) for kind in ("sdxl", "sd", "sd3")}
    yield built
    for engine in built.values():
        engine.close()


@pytest.mark.parametrize("kind", ["sdxl", "sd"])
def test_guidance_interval_equals_diffusers_switching_guidance_by_callback(engines, kind):
    engine = engines[kind]
    requests = [{**COMMON, "guidance_interval": [0.2, 0.8], "seed": 1},
                {**COMMON, "guidance_interval": [0.0, 0.4], "negative_prompt": "fog", "seed": 2},  # dynamic CFG
                {**COMMON, "guidance_interval": [0.5, 1.0], "num_inference_steps": 6, "seed": 3},
                {**COMMON, "seed": 4}]  # every step guided, in the same calls
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images for job in jobs]
    for values, (ours,) in zip(requests, results):
        (theirs,) = interval_images(engine.model, engine.parse(values))
        assert diff_p99(ours, theirs) <= TOLERANCE, (values.get("guidance_interval"), diff_p99(ours, theirs))
    # steps 0, 1 and 8, 9 of 10 unguided; steps 4-9; steps 0-2 of 6; none
    assert [job.rows_saved["guidance_interval"] for job in jobs] == [4, 6, 3, 0]
    assert all(job.most_images_per_call == 4 for job in jobs)  # one row or two, they share calls


def test_deep_cache_of_interval_one_is_the_plain_image(engines):
    engine = engines["sdxl"]
    plain = engine.images({**COMMON, "seed": 5})[0]
    assert np.array_equal(engine.images({**COMMON, "seed": 5, "cache": "deep", "cache_interval": 1})[0], plain)


@pytest.mark.parametrize("kind", ["sdxl", "sd"])
def test_deep_cache_runs_the_deep_blocks_every_interval_steps_per_image(engines, kind):
    engine = engines[kind]
    requests = [{**COMMON, "cache": "deep", "cache_interval": 3, "seed": 6},
                {**COMMON, "cache": "deep", "cache_interval": 2, "num_inference_steps": 5, "seed": 7},
                {**COMMON, "seed": 8}]
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images[0] for job in jobs]
    logs = [job.cache_logs[0] for job in jobs[:2]]
    assert logs[0] == ["full", "cached", "cached"] * 3 + ["full"]
    assert logs[1] == ["full", "cached", "full", "cached", "full"]
    assert [job.rows_saved["cache"] for job in jobs] == [12, 4, 0]
    # the plain neighbour is its own image; the cached ones stay near theirs
    assert diff_p99(results[2], engine.images({**COMMON, "seed": 8})[0]) <= TOLERANCE
    plain = engine.images({**COMMON, "seed": 6})[0]
    assert 0 < max_diff(results[0], plain) and diff_p99(results[0], plain) <= 40


def test_first_block_cache_equals_diffusers_hook(engines):
    engine = engines["sd3"]
    for threshold in (0.6, 1e-6):  # skips some steps; skips none (then: exactly the plain image)
        values = {**COMMON, "cache": "first_block", "cache_threshold": threshold, "seed": 9}
        (job,) = engine.submit(values)
        (ours,) = job.future.result(120).images
        (theirs,) = first_block_cache_images(engine.model, engine.parse(values))
        assert diff_p99(ours, theirs) <= TOLERANCE, (threshold, diff_p99(ours, theirs))
        assert ("cached" in job.cache_logs[0]) == (threshold > 0.01), job.cache_logs[0]
    assert np.array_equal(ours, engine.images({**COMMON, "seed": 9})[0])


@pytest.mark.parametrize("kind, values, words", [
    ("sd3", {"cache": "deep"}, "cache: deep is for UNet models (SD 1.x/2.x, SDXL); this model takes cache first_block"),
    ("sdxl", {"cache": "first_block"}, "this model takes cache deep"),
    ("sdxl", {"cache_interval": 2}, "cache_interval: applies to cache deep; this request's cache is none"),
    ("sdxl", {"cache": "deep", "cache_threshold": 0.2}, "cache_threshold: applies to cache first_block"),
    ("sdxl", {"guidance_interval": [0.8, 0.2]}, "guidance_interval: [lo, hi] with lo < hi"),
    ("sdxl", {"guidance_interval": [0.1, 1.5]}, "guidance_interval"),
    ("sdxl", {"cache": "deep", "cache_interval": 11}, "cache_interval"),
])
def test_bad_settings_name_the_field(engines, kind, values, words):
    with pytest.raises(InvalidInput) as error:
        engines[kind].parse({**COMMON, **values})
    assert words in error.value.reason
