"""ControlNets, T2I-Adapters and IP-Adapters in the step loop against the oracle:
StableDiffusion[XL]ControlNet(Img2Img)Pipeline, StableDiffusion[XL]AdapterPipeline and the
pipelines with ``load_ip_adapter`` give the same images for the same seeds, alone, with several
ControlNets, with start/end, with img2img, inpainting (StableDiffusion[XL]ControlNetInpaintPipeline)
and LoRA adapters, and while requests with other controls and none share every UNet call."""

import shutil

import numpy as np
import pytest
from kserve.errors import InvalidInput

from helpers.control_models import write_controls
from helpers.images import b64_image, make_image, make_mask
from helpers.oracle import TOLERANCE, LocalEngine, assert_matches, max_diff
from sdserve.tiny import write_tiny_model

SIZE = {"width": 128, "height": 128}
EDGES = b64_image(make_image(128, 128, seed=1))
DEPTH = b64_image(make_image(160, 96, seed=2))  # resized to the output size, as the pipelines do
START = b64_image(make_image(128, 128, seed=3))
MASK = b64_image(make_mask(128, 128))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from sdserve.adapters import Adapters

    root = tmp_path_factory.mktemp("control-models")
    sdxl = write_controls(write_tiny_model(root / "sdxl", "sdxl", loras=("trex",)), "sdxl")
    sd = write_controls(write_tiny_model(root / "sd", "sd"), "sd")
    inpaint = write_controls(write_tiny_model(root / "sd-inpaint", "sd-inpaint"), "sd")  # a 9-channel UNet
    made = {"sdxl": LocalEngine(sdxl, control_dir=sdxl / "controls",
                                adapters=Adapters(sdxl / "loras", rescan_seconds=0)),
            "sd": LocalEngine(sd, control_dir=sd / "controls"),
            "sd-inpaint": LocalEngine(inpaint, control_dir=inpaint / "controls")}
    yield made
    for engine in made.values():
        engine.close()


CASES = [
    ("sdxl", [{"model": "edges", "image": EDGES}], {}),
    ("sdxl", [{"model": "edges", "image": EDGES, "scale": 0.6, "start": 0.2, "end": 0.7}], {"num_images": 2}),
    ("sdxl", [{"model": "edges", "image": EDGES, "scale": 0.8, "end": 0.5},
              {"model": "depth", "image": DEPTH, "scale": 1.3, "start": 0.3}], {"negative_prompt": "fog"}),
    ("sdxl", [{"model": "depth", "image": DEPTH}], {"guidance_scale": 1.0, "scheduler": "DPM++ 2M Karras"}),
    ("sdxl", [{"model": "edges", "image": EDGES, "start": 0.25}], {"image": START, "strength": 0.7}),
    ("sdxl", [{"model": "edges", "image": EDGES, "scale": 0.7}], {"loras": [{"name": "trex", "scale": 0.8}]}),
    ("sdxl", [{"model": "sketch", "image": DEPTH, "scale": 0.8}], {}),
    ("sdxl", [{"model": "sketch", "image": EDGES, "end": 0.5}], {"num_images": 2}),
    ("sdxl", [{"model": "edges", "image": START, "preprocessor": "canny", "low_threshold": 50}], {}),
    ("sd", [{"model": "edges", "image": EDGES, "scale": 1.5}], {"negative_prompt": "fog"}),
    ("sd", [{"model": "edges", "image": EDGES}, {"model": "depth", "image": DEPTH, "end": 0.6}], {}),
    ("sd", [{"model": "sketch", "image": EDGES}], {}),
    ("sdxl", [{"model": "style", "image": DEPTH}], {}),
    ("sdxl", [{"model": "style", "image": START, "scale": 0.5}, {"model": "edges", "image": EDGES, "end": 0.6}],
     {"num_images": 2}),
    ("sdxl", [{"model": "style", "image": DEPTH, "scale": 1.5}], {"image": START, "strength": 0.6}),
    ("sdxl", [{"model": "style", "image": DEPTH}], {"loras": ["trex"], "guidance_scale": 1.0}),
    ("sd", [{"model": "style", "image": DEPTH, "scale": 0.7}], {"negative_prompt": "fog"}),
    ("sdxl", [{"model": "style", "image": [DEPTH, START, EDGES], "scale": 0.8}], {}),
    ("sdxl", [{"model": "edges", "image": EDGES}], {"image": START, "mask": MASK}),
    ("sdxl", [{"model": "depth", "image": DEPTH, "scale": 0.7, "start": 0.2}], {"image": START, "mask": MASK,
                                                                               "strength": 0.7}),
    ("sdxl", [{"model": "style", "image": DEPTH}], {"image": START, "mask": MASK, "strength": 0.8}),
    ("sd-inpaint", [{"model": "edges", "image": EDGES, "scale": 1.2}], {"image": START, "mask": MASK}),
]


@pytest.mark.parametrize("kind, controls, values", CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_each_control_request_gives_the_diffusers_image(engines, kind, controls, values):
    request = {"prompt": "a lighthouse at dusk", "seed": 3, "num_inference_steps": 5, **SIZE, "controls": controls,
               **values}
    engine = engines[kind]
    ours = engine.images(request)
    assert_matches(ours, engine.reference(request))
    plain = engine.images({k: v for k, v in request.items() if k != "controls"})
    assert max_diff(ours[0], plain[0]) > 2 * TOLERANCE  # the control changed the image


def test_requests_with_different_controls_and_none_share_every_unet_call(engines):
    engine = engines["sdxl"]
    common = {"prompt": "a fox", **SIZE}
    requests = [{**common, "seed": 1, "num_inference_steps": 6},
                {**common, "seed": 2, "num_inference_steps": 5, "controls": [{"model": "edges", "image": EDGES}]},
                {**common, "seed": 3, "num_inference_steps": 6, "guidance_scale": 1.0,
                 "controls": [{"model": "edges", "image": DEPTH, "scale": 0.5, "end": 0.6},
                              {"model": "depth", "image": EDGES}]},
                {**common, "seed": 4, "num_inference_steps": 4, "controls": [{"model": "sketch", "image": EDGES}]},
                {**common, "seed": 5, "num_inference_steps": 5, "loras": ["trex"],
                 "controls": [{"model": "depth", "image": DEPTH, "start": 0.4}]},
                {**common, "seed": 6, "num_inference_steps": 5, "controls": [{"model": "style", "image": START}]},
                {**common, "seed": 7, "num_inference_steps": 4, "guidance_scale": 1.0,
                 "controls": [{"model": "style", "image": EDGES, "scale": 0.4}]}]
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images for job in jobs]
    for values, ours in zip(requests, results):
        assert_matches(ours, engine.reference(values))
    assert max(job.most_images_per_call for job in jobs) == len(requests)


def test_controls_with_the_ensemble_refiner(tmp_path):
    """The base's steps take the ControlNet, whose start/end are fractions of the whole schedule
    (the pipeline's, before denoising_end cuts it); the refiner takes none."""
    folder = write_controls(write_tiny_model(tmp_path / "refiner", "sdxl-refiner"), "sdxl", ("edges",))
    engine = LocalEngine(folder, control_dir=folder / "controls")
    try:
        request = {"prompt": "a fox", "seed": 3, "num_inference_steps": 10, **SIZE,
                   "controls": [{"model": "edges", "image": EDGES, "start": 0.1, "end": 0.7, "scale": 0.9}]}
        assert_matches(engine.images(request), engine.reference(request))
    finally:
        engine.close()


def test_several_reference_images_share_calls_with_the_same_count_only(engines):
    """An IP-Adapter's reference images are one tensor per call: two of them split from one and
    none, which share (policy.py)."""
    engine = engines["sdxl"]
    common = {"prompt": "a fox", "num_inference_steps": 4, **SIZE}
    requests = [{**common, "seed": 1}, {**common, "seed": 2, "controls": [{"model": "style", "image": EDGES}]},
                {**common, "seed": 3, "controls": [{"model": "style", "image": [EDGES, DEPTH]}]},
                {**common, "seed": 4, "controls": [{"model": "style", "image": [DEPTH, START], "scale": 0.5}]}]
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images for job in jobs]
    for values, ours in zip(requests, results):
        assert_matches(ours, engine.reference(values))
    assert [job.most_images_per_call for job in jobs] == [2, 2, 2, 2]


def test_more_control_models_in_flight_than_the_bound_are_loaded_again(engines, tmp_path):
    """--max_loaded_controls 1 with two ControlNets in one call: each step loads one again (the
    least recently used goes), and every image is still diffusers'."""
    from sdserve import metrics

    engine = LocalEngine(engines["sd"].control_dir.parent, control_dir=engines["sd"].control_dir,
                         max_loaded_controls=1)
    try:
        before = metrics.CONTROL_EVICTIONS._value.get()
        requests = [{"prompt": "a fox", "seed": i, "num_inference_steps": 3, **SIZE,
                     "controls": [{"model": name, "image": EDGES}]} for i, name in enumerate(("edges", "depth"))]
        jobs = engine.submit(*requests)
        for values, job in zip(requests, jobs):
            assert_matches(job.future.result(120).images, engine.reference(values))
        assert metrics.CONTROL_EVICTIONS._value.get() - before >= 3  # at least one per step
    finally:
        engine.close()


def test_a_new_control_folder_is_served_without_a_restart(engines, tmp_path):
    engine = engines["sd"]
    request = {"prompt": "a fox", "seed": 1, "num_inference_steps": 3, **SIZE,
               "controls": [{"model": "later", "image": EDGES}]}
    with pytest.raises(InvalidInput, match=r"controls\[0\].model: no control model named 'later'; available: "
                                           r"depth, edges, sketch, style"):
        engine.parse(request)
    folder = engine.control_dir / "later"
    shutil.copytree(engine.control_dir / "edges", folder)
    try:
        ours = engine.images(request)
        assert_matches(ours, engine.reference(request))
    finally:
        shutil.rmtree(folder)


def test_canny_is_opencv_canny_as_three_channels():
    import cv2

    from sdserve.request.canny import canny_edges

    picture = make_image(96, 64, seed=5)
    edges = np.asarray(canny_edges(picture, 60, 180))
    expected = cv2.Canny(np.asarray(picture), 60, 180)
    assert edges.shape == (64, 96, 3) and all(np.array_equal(edges[..., c], expected) for c in range(3))
    assert set(np.unique(edges)) == {0, 255}


REFUSED = [
    ("sdxl", [{"model": "nope", "image": EDGES}], {}, r"controls\[0\].model: no control model named 'nope'; "
                                                      r"available: depth, edges, sketch, style"),
    ("sdxl", [{"model": "style", "image": EDGES, "end": 0.5}], {}, r"controls\[0\].end: an IP-Adapter's reference "
                                                                    r"image applies at every step"),
    ("sdxl", [{"model": "style", "image": EDGES, "preprocessor": "canny"}], {}, r"controls\[0\].preprocessor: "),
    ("sdxl", [{"model": "style", "image": EDGES}, {"model": "style", "image": DEPTH}], {},
     r"controls\[0\].model: IP-Adapter style is given twice; give it once, with a list of reference images"),
    ("sdxl", [{"model": "edges", "image": [EDGES, DEPTH]}], {},
     r"controls\[0\].image: a list is for an IP-Adapter's reference images; a controlnet takes one image"),
    ("sdxl", [{"model": "style", "image": [EDGES] * 5}], {},
     r"controls\[0\].image: give 1 to 4 reference images, got 5"),
    ("sdxl", [{"model": "edges", "image": EDGES, "scale": 2.5}], {},
     r"controls\[0\].scale: must be a finite number in \[0.0, 2.0\], got 2.5"),
    ("sdxl", [{"model": "edges", "image": EDGES, "start": 0.6, "end": 0.4}], {},
     r"controls\[0\].start: 0.6 must be below end \(0.4\)"),
    ("sdxl", [{"model": "edges", "image": EDGES, "end": 1.5}], {}, r"controls\[0\].end: .*\[0.0, 1.0\]"),
    ("sdxl", [{"model": "edges", "image": "bm90IGFuIGltYWdl"}], {}, r"controls\[0\].image: not a readable PNG"),
    ("sdxl", [{"model": "edges", "image": b64_image(make_image(32, 32))}], {},
     r"controls\[0\].image: 32x32 is smaller than the server minimum of 64"),
    ("sdxl", [{"model": "edges"}], {}, r"controls\[0\].image: required field is missing"),
    ("sdxl", [{"model": "edges", "image": EDGES, "strength": 1}], {},
     r"controls\[0\].strength: unknown field; allowed: model, image, scale, start, end, preprocessor"),
    ("sdxl", [{"model": "edges", "image": EDGES, "preprocessor": "depth"}], {},
     r"controls\[0\].preprocessor: .*one of canny, none"),
    ("sdxl", [{"model": "edges", "image": EDGES}] * 5, {}, r"controls: must be a list of at most 4 controls"),
    ("sdxl", [{"model": "sketch", "image": EDGES, "start": 0.2}], {}, r"controls\[0\].start: a T2I-Adapter applies "
                                                                      r"from the first step"),
    ("sdxl", [{"model": "sketch", "image": EDGES}], {"image": START}, r"controls\[0\].model: sketch is a T2I-Adapter"),
    ("sdxl", [{"model": "edges", "image": EDGES}], {"cache": "deep"}, r"controls: .*give cache: none"),
    ("sdxl", "not a list", {}, r"controls: must be a list of at most 4 controls"),
]


@pytest.mark.parametrize("kind, controls, values, message", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_bad_controls_are_refused_by_name(engines, kind, controls, values, message):
    with pytest.raises(InvalidInput, match=message):
        engines[kind].parse({"prompt": "a fox", "controls": controls, **values})


def test_models_without_controls_refuse_them(models):
    import torch

    from sdserve.models.layout import discover
    from sdserve.models.loading import load
    from sdserve.request.types import Limits
    from sdserve.request.validation import RequestParser

    caps = load(discover(models["sd3"]), torch.device("cpu"), torch.float32).capabilities
    with pytest.raises(InvalidInput, match="controls: control models are for SD 1.x/2.x and SDXL text-to-image "
                                           "models; the loaded model is a StableDiffusion3Pipeline"):
        RequestParser(Limits(), caps).parse({"prompt": "x", "controls": [{"model": "edges", "image": EDGES}]})


def test_describe_names_the_controls_not_their_images(engines):
    request = engines["sdxl"].parse({"prompt": "x", "controls": [{"model": "edges", "image": EDGES, "end": 0.5}]})
    assert request.describe()["controls"] == [{"model": "edges", "kind": "controlnet", "scale": 1.0, "start": 0.0,
                                               "end": 0.5}]
    assert "controls" not in engines["sdxl"].parse({"prompt": "x"}).describe()
