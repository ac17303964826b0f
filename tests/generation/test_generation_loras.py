"""LoRA adapters in the step-level loop against the oracle: the images diffusers gives with the same
adapters and scales, exactly the base's with no adapter, each request's own images while requests
with different adapters are in flight together, and a new adapter folder found and loaded on first
use."""

import shutil

import numpy as np
import pytest

from helpers.oracle import TOLERANCE, LocalEngine, assert_matches, max_diff


@pytest.fixture(scope="module")
def with_loras(models):
    from sdserve.adapters import Adapters

    engine = LocalEngine(models["sdxl-loras"], adapters=Adapters(models["sdxl-loras"] / "loras", rescan_seconds=0))
    yield engine
    engine.close()


def test_loras_match_diffusers_and_no_lora_is_exactly_the_base(with_loras, models):
    common = {"prompt": "a dinosaur", "seed": 4, "num_inference_steps": 3}
    plain = with_loras.images(common)[0]
    trex = with_loras.images({**common, "loras": [{"name": "trex", "scale": 1.0}]})[0]
    both = {**common, "loras": ["trex", {"name": "pixel", "scale": 0.5}]}
    assert_matches(with_loras.images(both), with_loras.reference(both))
    assert max_diff(plain, trex) > 2 * TOLERANCE and max_diff(trex, with_loras.images(both)[0]) > 2 * TOLERANCE
    assert np.array_equal(plain, with_loras.images(common)[0])  # nothing left over from the LoRA requests
    no_adapters = LocalEngine(models["sdxl"])  # the same base weights with no adapters loaded at all
    try:
        assert np.array_equal(plain, no_adapters.images(common)[0])
    finally:
        no_adapters.close()


def test_requests_with_different_adapters_in_flight_together(with_loras):
    values = [{"prompt": "a dinosaur", "seed": s, "num_inference_steps": 4, **extra}
              for s, extra in [(1, {}), (2, {"loras": ["trex"]}), (3, {"loras": [{"name": "pixel", "scale": 0.7}]})]]
    results = [job.future.result(60) for job in with_loras.submit(*values)]
    for v, result in zip(values, results):
        assert_matches(result.images, with_loras.reference(v))


def test_a_new_adapter_folder_is_found_and_loaded_on_first_use(with_loras):
    adapters = with_loras.adapters
    assert not adapters.exists("fresh")
    shutil.copytree(adapters.store.root / "trex", adapters.store.root / "fresh")
    try:
        common = {"prompt": "a dinosaur", "seed": 4, "num_inference_steps": 3}
        fresh = with_loras.images({**common, "loras": ["fresh"]})[0]
        assert np.array_equal(fresh, with_loras.images({**common, "loras": ["trex"]})[0])
        assert "fresh" in adapters.names()
    finally:
        shutil.rmtree(adapters.store.root / "fresh")
