"""Image inputs against the oracle: img2img and inpainting give the image diffusers' own
AutoPipelineForImage2Image / AutoPipelineForInpainting (or the loaded inpainting or refiner
pipeline) gives for the same seed, strength and mask, alone and inside mixed traffic."""

import numpy as np
import pytest

from helpers.images import b64_image, make_image, make_mask
from helpers.oracle import TOLERANCE, LocalEngine, diff_p99, max_diff


@pytest.fixture(scope="module")
def engines(models):
    made = {kind: LocalEngine(models[kind]) for kind in ("sdxl-refiner", "sd", "sd3", "sd-inpaint", "sdxl-inpaint",
                                                       "refiner-only")}
    yield made
    for engine in made.values():
        engine.close()


IMAGE = b64_image(make_image(128, 128))
MASK = b64_image(make_mask(128, 128))


def assert_matches(ours, reference):
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape and a.dtype == np.uint8
        assert diff_p99(a, b) <= TOLERANCE, (diff_p99(a, b), max_diff(a, b))


CASES = [
    ("sdxl-refiner", {"refiner": "none", "strength": 0.6}),
    ("sdxl-refiner", {"refiner": "none", "strength": 0.5, "num_images": 2, "negative_prompt": "blurry",
                      "scheduler": "Euler a"}),
    ("sdxl-refiner", {"refiner": "ensemble", "strength": 0.7, "high_noise_frac": 0.7}),
    ("sdxl-refiner", {"refiner": "refine", "strength": 0.6, "refiner_strength": 0.4}),
    ("sdxl-refiner", {"mask": MASK}),
    ("sdxl-refiner", {"mask": MASK, "strength": 0.7, "guidance_scale": 1.0}),
    ("sd", {"strength": 0.75}),
    ("sd", {"strength": 0.5, "scheduler": "Euler a", "num_images": 2}),
    ("sd", {"mask": MASK, "strength": 0.8, "negative_prompt": "blurry"}),
    ("sd3", {"strength": 0.75}),
    ("sd3", {"mask": MASK, "strength": 0.9}),
    ("sd3", {"mask": MASK}),
    ("sd-inpaint", {"mask": MASK}),
    ("sd-inpaint", {"mask": MASK, "strength": 0.6, "num_images": 2}),
    ("sdxl-inpaint", {"mask": MASK, "strength": 0.8}),
    ("refiner-only", {"strength": 0.3}),
]


@pytest.mark.parametrize("kind, values", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_image_input_gives_the_diffusers_image(engines, kind, values):
    values = {"prompt": "a red fox", "image": IMAGE, "num_inference_steps": 6, "seed": 11, **values}
    engine = engines[kind]
    ours = engine.images(values)
    assert_matches(ours, engine.reference(values))


def test_image_requests_share_steps_with_text_requests_and_match_alone(engines):
    engine = engines["sdxl-refiner"]
    img2img = {"prompt": "a fox", "image": IMAGE, "strength": 0.8, "refiner": "none", "num_inference_steps": 8,
               "seed": 3}
    inpaint = {"prompt": "a cat", "image": IMAGE, "mask": MASK, "num_inference_steps": 5, "seed": 4}
    text = {"prompt": "a dog", "width": 128, "height": 128, "refiner": "none", "num_inference_steps": 7, "seed": 5}
    alone = [engine.images(v) for v in (img2img, inpaint, text)]
    jobs = engine.submit(img2img, inpaint, text)
    together = [job.future.result(60) for job in jobs]
    for result, images in zip(together, alone):
        assert_matches(result.images, images)
    assert max(r.batch_images for r in together) >= 2  # they did share denoiser calls
