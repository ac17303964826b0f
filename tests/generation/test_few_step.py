"""Few-step generation against the oracle: the LCM and TCD samplers, eta, timestep_spacing and
custom timesteps give the image diffusers gives (within TOLERANCE levels at the 99th percentile),
alone and inside mixed traffic; bad values are a 400 that names the field."""

import numpy as np
import pytest
from kserve.errors import InvalidInput
from prometheus_client import REGISTRY

from helpers.images import b64_image, make_image
from helpers.oracle import TOLERANCE, LocalEngine, diff_p99, max_diff
from sdserve.models.capabilities import ModelCapabilities
from sdserve.models.schedulers import FLOW_SCHEDULERS, SCHEDULERS
from sdserve.request.types import Limits, RefinerMode
from sdserve.request.validation import RequestParser

BASE = {"prompt": "a cat", "seed": 5, "width": 128, "height": 128, "num_inference_steps": 4, "negative_prompt": "ugly"}
DMD2 = [999, 749, 499, 249]  # DMD2's four-step schedule
IMAGE = b64_image(make_image(128, 128, seed=3))


@pytest.fixture(scope="module")
def engines(models):
    made = {kind: LocalEngine(models[kind]) for kind in ("sdxl", "sd", "sdxl-refiner")}
    yield made
    for engine in made.values():
        engine.close()


def assert_matches(ours: list[np.ndarray], reference: list[np.ndarray]) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape and a.dtype == np.uint8
        assert diff_p99(a, b) <= TOLERANCE, (diff_p99(a, b), max_diff(a, b))


ALONE = [
    ("sdxl", {"scheduler": "LCM"}),
    ("sdxl", {"scheduler": "TCD"}),  # TCD's own eta, 0.3
    ("sdxl", {"scheduler": "TCD", "eta": 0.8, "num_images": 2}),
    ("sdxl", {"scheduler": "DDIM", "eta": 0.5}),
    ("sdxl", {"scheduler": "Euler", "timestep_spacing": "leading"}),
    ("sdxl", {"scheduler": "Euler", "timestep_spacing": "linspace"}),
    ("sdxl", {"scheduler": "Euler", "timestep_spacing": "trailing", "guidance_scale": 1.0}),  # SDXL-Lightning
    ("sdxl", {"scheduler": "DDIM", "timestep_spacing": "trailing"}),  # Hyper-SD
    ("sdxl", {"scheduler": "DDIM", "timestep_spacing": "TRAILING", "num_inference_steps": 1}),
    ("sdxl", {"scheduler": "LCM", "timesteps": DMD2, "guidance_scale": 1.0}),  # DMD2
    ("sdxl", {"scheduler": "Euler", "timesteps": DMD2, "num_inference_steps": 4}),
    ("sdxl", {"scheduler": "DPM++ 2M", "timesteps": [999, 700, 400, 200, 50], "num_inference_steps": None}),
    ("sd", {"scheduler": "LCM", "num_inference_steps": 6}),
    ("sd", {"eta": 0.5, "timestep_spacing": "trailing"}),  # the model's own sampler, DDIM
    ("sd", {"scheduler": "TCD", "timesteps": "[999, 845, 500]", "num_inference_steps": None}),  # JSON text, as gRPC
    ("sd", {"scheduler": "TCD", "eta": 0.5, "timestep_spacing": None, "image": IMAGE, "strength": 0.6}),
    ("sd", {"scheduler": "LCM", "image": IMAGE, "strength": 0.75, "num_inference_steps": 4}),
    ("sdxl-refiner", {"refiner": "ensemble", "scheduler": "Euler", "timestep_spacing": "trailing",
                      "num_inference_steps": 6}),
    ("sdxl-refiner", {"refiner": "refine", "scheduler": "DDIM", "eta": 0.5, "timestep_spacing": "trailing",
                      "num_inference_steps": 6, "refiner_strength": 0.5}),
]


@pytest.mark.parametrize("kind, values", ALONE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(ALONE)])
def test_each_sampler_and_setting_gives_the_diffusers_image(engines, kind, values):
    request = {**BASE, "refiner": "none", **values}
    ours = engines[kind].images(request)
    assert ours[0].std() > 5
    assert_matches(ours, engines[kind].reference(request))


def test_each_setting_changes_the_image(engines):
    engine = engines["sdxl"]

    def image(**values):
        return engine.images({**BASE, **values})[0]

    for a, b in [
        ({"scheduler": "Euler", "timestep_spacing": "leading"}, {"scheduler": "Euler", "timestep_spacing": "trailing"}),
        ({"scheduler": "DDIM"}, {"scheduler": "DDIM", "eta": 0.5}),
        ({"scheduler": "DDIM"}, {"scheduler": "DDIM", "eta": 0.0, "timestep_spacing": "trailing"}),
        ({"scheduler": "TCD"}, {"scheduler": "TCD", "eta": 0.0}),
        ({"scheduler": "LCM"}, {"scheduler": "LCM", "timesteps": [999, 500], "num_inference_steps": None}),
    ]:
        assert max_diff(image(**a), image(**b)) > 2 * TOLERANCE, (a, b)
    # what a request leaves out is the default: TCD's eta is 0.3, DDIM's 0.0
    assert np.array_equal(image(scheduler="TCD"), image(scheduler="TCD", eta=0.3))
    assert np.array_equal(image(scheduler="DDIM"), image(scheduler="DDIM", eta=0.0))


MIXED = [
    {**BASE, "seed": 1, "scheduler": "LCM", "guidance_scale": 1.0},
    {**BASE, "seed": 2, "scheduler": "TCD", "eta": 0.6, "num_images": 2},
    {**BASE, "seed": 3, "scheduler": "DDIM", "eta": 0.4, "timestep_spacing": "trailing", "num_inference_steps": 6},
    {**BASE, "seed": 4, "scheduler": "Euler", "timestep_spacing": "trailing", "num_inference_steps": 3},
    {**BASE, "seed": 5, "scheduler": "LCM", "timesteps": DMD2},
    {**BASE, "seed": 6, "scheduler": "Euler", "timesteps": [999, 600, 300], "num_inference_steps": None,
     "guidance_scale": 1.0},
    {**BASE, "seed": 7, "num_inference_steps": 6, "refiner": "ensemble", "scheduler": "DDIM", "eta": 0.3,
     "timestep_spacing": "linspace"},
]


def test_each_request_in_mixed_traffic_gives_its_image_alone(models):
    """Different samplers, eta, spacings, schedules and guidance, sharing denoiser calls."""
    engine = LocalEngine(models["sdxl-refiner"], max_batch_images=3)
    try:
        values = [{"refiner": "none", **v} for v in MIXED]
        results = [job.future.result(120) for job in engine.submit(*values)]
        assert max(r.batch_images for r in results) == 3  # calls were shared
        for v, result in zip(values, results):
            assert_matches(result.images, engine.images(v))
            assert_matches(result.images, engine.reference(v))
    finally:
        engine.close()


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.mark.parametrize("guidance, rows_per_image", [(1.0, 1), (5.0, 2)])
def test_guidance_one_runs_one_denoiser_row_per_image(engines, guidance, rows_per_image):
    engine = engines["sdxl"]
    values = {**BASE, "scheduler": "LCM", "timesteps": DMD2, "guidance_scale": guidance, "num_images": 2}
    rows, images = _sample("sdserve_denoiser_rows_sum"), _sample("sdserve_batch_size_images_sum")
    ours = engine.images(values)
    images = _sample("sdserve_batch_size_images_sum") - images
    assert images == 2 * len(DMD2)
    assert _sample("sdserve_denoiser_rows_sum") - rows == rows_per_image * images
    assert_matches(ours, engine.reference(values))


def test_requests_resolve_and_describe_the_settings(engines):
    sdxl, refiner = engines["sdxl"], engines["sdxl-refiner"]
    tcd = sdxl.parse({**BASE, "scheduler": "tcd"})
    assert tcd.eta == 0.3 and tcd.describe()["eta"] == 0.3  # resolved, so a PNG's parameters reproduce it
    plain = sdxl.parse({**BASE, "scheduler": "DDIM"}).describe()
    assert not {"eta", "timestep_spacing", "timesteps"} & set(plain)  # shown only when set
    custom = sdxl.parse({**BASE, "scheduler": "LCM", "timesteps": "[999, 749, 499]", "num_inference_steps": None})
    assert custom.timesteps == (999, 749, 499) and custom.num_inference_steps == 3
    assert custom.describe()["timesteps"] == [999, 749, 499]
    stored = {k: v for k, v in custom.image_parameters(custom.seed, "m").items() if k != "model"}
    assert sdxl.parse(stored) == custom  # the parameters stored in its PNG reproduce it
    spaced = sdxl.parse({**BASE, "scheduler": "Euler", "timestep_spacing": "Trailing"})
    assert spaced.timestep_spacing == "trailing" and spaced.describe()["timestep_spacing"] == "trailing"
    # custom timesteps run on the base alone: the refiner mode defaults to none, as with a mask
    assert refiner.parse({**BASE, "scheduler": "LCM", "timesteps": DMD2}).refiner is RefinerMode.NONE
    assert refiner.parse({**BASE, "scheduler": "LCM", "timesteps": DMD2, "refiner": True}).refiner is RefinerMode.NONE
    assert refiner.parse({**BASE, "scheduler": "LCM"}).refiner is RefinerMode.ENSEMBLE


def test_the_schema_declares_the_settings_and_the_samplers(engines):
    props = engines["sdxl"].parser.schema()["properties"]
    assert props["eta"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert props["timestep_spacing"]["anyOf"][0]["enum"] == ["leading", "linspace", "trailing"]
    assert props["timesteps"]["anyOf"][0] == {"type": "array", "minItems": 1, "maxItems": 100,
                                              "items": {"type": "integer", "minimum": 0, "maximum": 999}}
    assert {"LCM", "TCD"} <= set(props["scheduler"]["anyOf"][0]["enum"]) == set(SCHEDULERS)
    assert not {"LCM", "TCD"} & set(FLOW_SCHEDULERS)


DO_ETA = "schedulers that do: DDIM, TCD$"
DO_TIMESTEPS = r"schedulers that do: DPM\+\+ 2M, DPM\+\+ 2M SDE, Euler, Heun, LCM, TCD$"
BAD = [
    ("sdxl", {"timestep_spacing": "sideways"}, r"^timestep_spacing: must be one of leading, linspace, trailing, got"),
    ("sdxl", {"timestep_spacing": 1}, "^timestep_spacing: must be one of"),
    ("sdxl", {"scheduler": "LCM", "timestep_spacing": "trailing"},
     "^timestep_spacing: the LCM scheduler does not take it; schedulers that do: DDIM, DEIS"),
    ("sdxl", {"scheduler": "LCM", "timesteps": [1000, 500]},
     r"^timesteps: must be a list of 1 to 100 integers from 0 to 999, strictly descending, got \[1000, 500\]$"),
    ("sdxl", {"scheduler": "LCM", "timesteps": [500, -1]}, "^timesteps: must be a list of 1 to 100 integers"),
    ("sdxl", {"scheduler": "LCM", "timesteps": [999, 499.5]}, "^timesteps: must be a list of 1 to 100 integers"),
    ("sdxl", {"scheduler": "LCM", "timesteps": [999, True]}, "^timesteps: must be a list of 1 to 100 integers"),
    ("sdxl", {"scheduler": "LCM", "timesteps": []}, "^timesteps: must be a list of 1 to 100 integers"),
    ("sdxl", {"scheduler": "LCM", "timesteps": "999, 500"}, "^timesteps: must be a list of 1 to 100 integers"),
    ("sdxl", {"scheduler": "LCM", "timesteps": list(range(101, 0, -1))}, "^timesteps: must be a list of 1 to 100"),
    ("sdxl", {"scheduler": "LCM", "timesteps": [999, 999]},
     r"^timesteps: must be strictly descending, got \[999, 999\]"),
    ("sdxl", {"scheduler": "LCM", "timesteps": [250, 500]}, "^timesteps: must be strictly descending"),
    ("sdxl", {"scheduler": "DDIM", "timesteps": DMD2},
     "^timesteps: the DDIM scheduler does not take it; " + DO_TIMESTEPS),
    ("sdxl", {"scheduler": "DPM++ 2M Karras", "timesteps": DMD2}, r"^timesteps: the DPM\+\+ 2M Karras scheduler"),
    ("sd", {"timesteps": DMD2}, "^timesteps: the DDIMScheduler scheduler does not take it"),  # the model's own
    ("sdxl", {"scheduler": "LCM", "timesteps": DMD2, "num_inference_steps": 8},
     "^num_inference_steps: 8 disagrees with the 4 timesteps given"),
    ("sdxl", {"scheduler": "LCM", "timesteps": DMD2, "image": IMAGE},
     "^timesteps: a custom schedule is for text-to-image only; with an image, give num_inference_steps and strength"),
    ("sdxl", {"scheduler": "Euler", "timesteps": DMD2, "timestep_spacing": "trailing"},
     "^timestep_spacing: timesteps set the schedule outright"),
    ("sdxl-refiner", {"scheduler": "LCM", "timesteps": DMD2, "refiner": "ensemble"},
     "^refiner: custom timesteps run on the base model only; allowed: none"),
    ("sdxl", {"scheduler": "DDIM", "eta": 1.5}, r"^eta: must be a finite number in \[0.0, 1.0\], got 1.5"),
    ("sdxl", {"scheduler": "DDIM", "eta": "-0.1"}, r"^eta: must be a finite number in \[0.0, 1.0\]"),
    ("sdxl", {"scheduler": "Euler", "eta": 0.5}, "^eta: the Euler scheduler does not take it; " + DO_ETA),
    ("sdxl", {"scheduler": "LCM", "eta": 0.0}, "^eta: the LCM scheduler does not take it; " + DO_ETA),
    ("sdxl", {"eta": 0.5}, "^eta: the EulerDiscreteScheduler scheduler does not take it"),  # the model's own
    ("sdxl", {"scheduler": "LCM", "num_inference_steps": 51},
     r"^num_inference_steps: the LCM scheduler runs at most 50 steps \(its original_inference_steps\), got 51"),
]


@pytest.mark.parametrize("kind, values, message", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_values_are_refused_naming_the_field(engines, kind, values, message):
    with pytest.raises(InvalidInput, match=message):
        engines[kind].parse({**BASE, **values})


def test_flow_models_take_none_of_the_settings():
    sd3 = ModelCapabilities("StableDiffusion3Pipeline", 1024, 1024, 28, 7.0, family="sd3",
                            scheduler_class="FlowMatchEulerDiscreteScheduler")
    parser = RequestParser(Limits(), sd3)
    for name, value in [("eta", 0.3), ("timestep_spacing", "trailing"), ("timesteps", DMD2)]:
        with pytest.raises(InvalidInput, match=f"^{name}: only SD 1.x/2.x and SDXL models accept this field"):
            parser.parse({"prompt": "x", name: value})
    with pytest.raises(InvalidInput, match="^scheduler: unknown scheduler 'LCM'; allowed: Euler, Heun"):
        parser.parse({"prompt": "x", "scheduler": "LCM"})
