"""The one validator: every field, its range, and error messages that name the field."""

import math

import pytest
from kserve.errors import InvalidInput

from helpers.capabilities import SD, SD3, SDXL, SDXL_NO_REFINER
from sdserve.models.capabilities import ModelCapabilities
from sdserve.request.types import MAX_SEED, GenerationRequest, Limits, RefinerMode
from sdserve.request.validation import RequestParser


def parse(values, model=SDXL, limits=Limits()) -> GenerationRequest:
    return RequestParser(limits, model).parse(values)


def test_defaults_come_from_the_model():
    r = parse({"prompt": "a dog"})
    assert (r.width, r.height, r.num_inference_steps, r.guidance_scale) == (1024, 1024, 30, 5.0)
    assert r.refiner is RefinerMode.ENSEMBLE and r.high_noise_frac == 0.8
    assert parse({"prompt": "a dog"}, SDXL_NO_REFINER).refiner is RefinerMode.NONE
    sd = parse({"prompt": "a dog"}, SD)
    assert (sd.width, sd.guidance_scale, sd.num_inference_steps) == (768, 7.5, 50)
    assert r.image_format == "png" and r.num_images == 1


def test_compatibility_fields_and_aliases():
    r = parse(
        {
            "prompt": "x",
            "guidance_scale": 8.0,
            "num_inference_steps": 50,
            "crops_coords_top_left": [256, 0],
            "width": 1024,
            "height": 1024,
            "denoising_limit": 0.7,
            "num_images_per_prompt": 2,
            "scheduler": "dpm++_2m_karras",
            "format": "JPG",
        }
    )
    assert r.crops_coords_top_left == (256, 0) and r.high_noise_frac == 0.7 and r.num_images == 2
    assert r.scheduler == "DPM++ 2M Karras" and r.image_format == "jpeg"


def test_random_seed_is_63_bit_and_returned_per_image():
    seeds = {parse({"prompt": "x"}).seed for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s <= MAX_SEED for s in seeds)
    assert max(seeds) > 2**40  # not a 16- or 32-bit seed
    r = parse({"prompt": "x", "seed": MAX_SEED, "num_images": 3})
    assert r.seeds == [MAX_SEED, 0, 1]
    assert parse({"prompt": "x", "seed": -1}).seed >= 0  # -1 means random, as in web UIs


def test_grpc_style_string_values_are_accepted():
    r = parse({"prompt": "x", "guidance_scale": "7.5", "num_inference_steps": "20", "target_size": "[512, 512]"})
    assert (r.guidance_scale, r.num_inference_steps, r.target_size) == (7.5, 20, (512, 512))


@pytest.mark.parametrize(
    "values, field, expected",
    [
        ({}, "prompt", "required"),
        ({"prompt": 5}, "prompt", "a string"),
        ({"prompt": "x" * 2001}, "prompt", "limit of 2000"),
        ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt", "a string"),
        ({"prompt": "x", "width": 1001}, "width", "multiple of 8 from 64 to 2048"),
        ({"prompt": "x", "height": 4096}, "height", "multiple of 8 from 64 to 2048"),
        ({"prompt": "x", "height": 8}, "height", "from 64"),
        ({"prompt": "x", "width": 512.5}, "width", "multiple of 8"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "from 1 to 100"),
        ({"prompt": "x", "num_inference_steps": 101}, "num_inference_steps", "from 1 to 100"),
        ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps", "integer"),
        ({"prompt": "x", "guidance_scale": math.nan}, "guidance_scale", "finite number in [0.0, 30.0]"),
        ({"prompt": "x", "guidance_scale": math.inf}, "guidance_scale", "finite"),
        ({"prompt": "x", "guidance_scale": "inf"}, "guidance_scale", "finite"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "[0.0, 30.0]"),
        ({"prompt": "x", "seed": 2**63}, "seed", f"from -1 to {MAX_SEED}"),
        ({"prompt": "x", "seed": "abc"}, "seed", "integer"),
        ({"prompt": "x", "num_images": 9}, "num_images", "from 1 to 8"),
        ({"prompt": "x", "scheduler": "Fastest"}, "scheduler", "allowed: DDIM"),
        ({"prompt": "x", "refiner": "twice"}, "refiner", "one of none, ensemble, refine"),
        ({"prompt": "x", "high_noise_frac": 1.0}, "high_noise_frac", "(0.0, 1.0)"),
        ({"prompt": "x", "denoising_limit": 0}, "denoising_limit", "(0.0, 1.0)"),
        ({"prompt": "x", "refiner_strength": 0}, "refiner_strength", "(0.0, 1.0]"),
        ({"prompt": "x", "crops_coords_top_left": [1]}, "crops_coords_top_left", "two integers"),
        ({"prompt": "x", "original_size": "big"}, "original_size", "two integers"),
        ({"prompt": "x", "format": "gif"}, "format", "one of jpeg, jpg, png, webp"),
        ({"prompt": "x", "quality": 0}, "quality", "from 1 to 100"),
        ({"prompt": "x", "strength": 0.5}, "strength", "applies to a start image; give image as well"),
        ({"prompt": "x", "mask": "aGVsbG8="}, "mask", "a mask needs an image to repaint"),
        ({"prompt": "x", "image": "aGVsbG8="}, "image", "not a readable PNG, JPEG or WebP image"),
        ({"prompt": "x", "image": "%%%"}, "image", "not valid base64"),
        ({"prompt": "x", "tiling": True}, "tiling", "unknown field; allowed fields:"),
        ({"prompt": "x", "num_images": 1, "num_images_per_prompt": 2}, "num_images_per_prompt", "given twice"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(values, field, expected):
    with pytest.raises(InvalidInput) as err:
        parse(values)
    assert err.value.reason.startswith(f"{field}:") and expected in err.value.reason
    assert "Input should" not in err.value.reason and "pydantic" not in err.value.reason  # sdserve's words only


def test_pixel_limit_is_checked_on_the_product():
    limits = Limits(max_side=2048, max_pixels=1024 * 1024)
    with pytest.raises(InvalidInput, match="width x height: 2048x1024 = 2097152 pixels exceeds the server limit"):
        parse({"prompt": "x", "width": 2048, "height": 1024}, limits=limits)


def test_refiner_modes_need_a_refiner():
    with pytest.raises(InvalidInput, match="refiner: 'ensemble' needs a refiner model and none is loaded; allowed: none"):
        parse({"prompt": "x", "refiner": "ensemble"}, SDXL_NO_REFINER)
    # a split given to a base-only server is harmless (the SDXL-on-OpenShift request sends it)
    assert parse({"prompt": "x", "denoising_limit": 0.8}, SDXL_NO_REFINER).refiner is RefinerMode.NONE
    assert parse({"prompt": "x", "refiner": False}).refiner is RefinerMode.NONE


def test_refiner_settings_that_leave_no_step_are_rejected():
    with pytest.raises(InvalidInput, match="refiner_strength: 0.3 of 2 steps leaves the refiner no step"):
        parse({"prompt": "x", "refiner": "refine", "num_inference_steps": 2})
    with pytest.raises(InvalidInput, match="num_inference_steps: the ensemble refiner mode needs at least 2 steps"):
        parse({"prompt": "x", "num_inference_steps": 1})


def test_schedulers_that_need_more_steps_say_so():
    with pytest.raises(InvalidInput, match="num_inference_steps: the PNDM scheduler needs at least 4 steps, got 3"):
        parse({"prompt": "x", "scheduler": "pndm", "num_inference_steps": 3})
    sd15 = ModelCapabilities("StableDiffusionPipeline", 512, 512, 50, 7.5, "sd", scheduler_class="PNDMScheduler")
    with pytest.raises(InvalidInput, match="the PNDMScheduler scheduler needs at least 4 steps"):
        parse({"prompt": "x", "num_inference_steps": 2}, sd15)
    assert parse({"prompt": "x", "num_inference_steps": 2, "scheduler": "Euler"}, sd15).num_inference_steps == 2


def test_fields_of_other_model_families_are_refused():
    for name, value, who in [("prompt_2", "y", "SDXL, SD3 and FLUX.1"), ("original_size", [512, 512], "SDXL"),
                             ("negative_prompt_2", "z", "SDXL, SD3 and FLUX.1"), ("prompt_3", "t5", "SD3")]:
        with pytest.raises(InvalidInput, match=f"{name}: only {who} models accept this field"):
            parse({"prompt": "x", name: value}, SD)
    with pytest.raises(InvalidInput, match="crops_coords_top_left: only SDXL models accept this field; the loaded model is a StableDiffusion3Pipeline"):
        parse({"prompt": "x", "crops_coords_top_left": [0, 0]}, SD3)
    r = parse({"prompt": "x", "prompt_3": "long t5 prompt", "negative_prompt_3": "blur"}, SD3)
    assert r.prompt_3 == "long t5 prompt" and r.negative_prompt == ""  # so the T5 negative counts
    no_t5 = ModelCapabilities("StableDiffusion3Pipeline", 1024, 1024, 28, 7.0, family="sd3")
    with pytest.raises(InvalidInput, match=r"prompt_3: the T5 encoder is not loaded \(--drop_t5\)"):
        parse({"prompt": "x", "prompt_3": "y"}, no_t5)


def test_flow_models_have_their_own_samplers():
    assert parse({"prompt": "x", "scheduler": "heun"}, SD3).scheduler == "Heun"
    with pytest.raises(InvalidInput, match=r"scheduler: unknown scheduler 'DPM\+\+ 2M'; allowed: Euler, Heun"):
        parse({"prompt": "x", "scheduler": "DPM++ 2M"}, SD3)


def test_loras_are_looked_up_by_name():
    class Catalog:
        def exists(self, name):
            return name in {"trex", "pixel-art"}

        def names(self):
            return ["pixel-art", "trex"]

    parser = RequestParser(Limits(), SDXL, Catalog())
    r = parser.parse({"prompt": "x", "loras": [{"name": "trex", "scale": 0.8}, "pixel-art"]})
    assert r.loras == (("trex", 0.8), ("pixel-art", 1.0))
    assert r.describe()["loras"] == [{"name": "trex", "scale": 0.8}, {"name": "pixel-art", "scale": 1.0}]
    assert parser.parse({"prompt": "x"}).loras == () and "loras" not in parser.parse({"prompt": "x"}).describe()
    for loras, message in [
        ([{"name": "../../etc/passwd"}], r"loras\[0\].name: no adapter named '../../etc/passwd'; available: pixel-art, trex"),
        ([{"name": "trex", "scale": 5}], r"loras\[0\].scale: must be a number from -2.0 to 2.0"),
        (["trex", {"name": "trex"}], r"loras\[1\].name: adapter 'trex' is listed twice"),
        ([{"name": "trex", "weight": 1}], r"loras\[0\]: must be \"name\" or"),
        ("trex", "loras: must be a list of at most 8 adapters"),
        (["a"] * 9, "loras: must be a list of at most 8 adapters"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            parser.parse({"prompt": "x", "loras": loras})


def test_server_limits_cap_the_defaults():
    assert parse({"prompt": "x"}, SD, Limits(max_steps=20)).num_inference_steps == 20
    small = parse({"prompt": "x"}, SDXL, Limits(max_side=768))
    assert (small.width, small.height) == (768, 768)
    budget = parse({"prompt": "x"}, SDXL, Limits(max_pixels=512 * 512))
    assert (budget.width, budget.height) == (512, 512)


def test_negative_prompt_per_text_encoder():
    r = parse({"prompt": "a", "negative_prompt": "blurry", "negative_prompt_2": "dark"})
    assert (r.negative(1), r.negative(2)) == ("blurry", "dark")
    assert parse({"prompt": "a", "negative_prompt": "blurry"}).negative(2) == "blurry"
    assert parse({"prompt": "a"}).negative(1) == ""


def test_unicode_prompts_are_fine():
    assert parse({"prompt": "夕焼けの富士山 🌋, café"}).prompt == "夕焼けの富士山 🌋, café"
