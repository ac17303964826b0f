"""The one validator: every field, its range, and error messages that name the field."""

import base64
import io
import math

import jsonschema
import pytest
from kserve.errors import InvalidInput
from PIL import Image

from sdserve.request.fields import ALIASES, FIELDS
from sdserve.models.capabilities import ModelCapabilities
from sdserve.request.types import MAX_SEED, GenerationRequest, Limits, RefinerMode
from sdserve.request.validation import RequestParser

SDXL = ModelCapabilities("StableDiffusionXLPipeline", 1024, 1024, 30, 5.0, family="sdxl", has_refiner=True)
SDXL_NO_REFINER = ModelCapabilities("StableDiffusionXLPipeline", 1024, 1024, 30, 5.0, family="sdxl")
SD = ModelCapabilities("StableDiffusionPipeline", 768, 768, 50, 7.5, family="sd")
SD3 = ModelCapabilities("StableDiffusion3Pipeline", 1024, 1024, 28, 7.0, family="sd3",
                        scheduler_class="FlowMatchEulerDiscreteScheduler", has_t5=True)


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
    for name, value, who in [("prompt_2", "y", "SDXL and SD3"), ("original_size", [512, 512], "SDXL"),
                             ("negative_prompt_2", "z", "SDXL and SD3"), ("prompt_3", "t5", "SD3")]:
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


# --- the pydantic model of the fields, and its JSON Schema ---

def _png(width: int = 64, height: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "gray").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# One example per alias (a new alias needs one here): alias -> (value, what else the request needs)
ALIAS_EXAMPLES = {
    "denoising_limit": (0.7, {}),
    "num_images_per_prompt": (2, {}),
    "num_outputs": (3, {}),
    "output_image_format": ("WEBP", {}),
    "prompt_strength": (0.5, {"image": _png()}),
    "denoising_strength": (0.6, {"image": _png()}),
    "init_images": ([_png(96, 64)], {}),
    "steps": (20, {}),
    "cfg_scale": (6.5, {}),
    "sampler_name": ("euler_a", {}),
}


def test_each_alias_means_its_field_for_the_parser_and_the_schema():
    assert set(ALIAS_EXAMPLES) == set(ALIASES)
    parser = RequestParser(Limits(), SDXL)
    schema = parser.schema()
    validator = jsonschema.Draft202012Validator(schema)
    for alias, (value, needs) in ALIAS_EXAMPLES.items():
        name = ALIASES[alias]
        by_alias = parser.parse({"prompt": "x", "seed": 1, **needs, alias: value})
        assert by_alias == parser.parse({"prompt": "x", "seed": 1, **needs, name: value}), alias
        assert by_alias.describe() == parser.parse({"prompt": "x", "seed": 1, **needs, name: value}).describe()
        assert alias in schema["properties"][name]["description"]
        json_value = value.lower() if alias == "output_image_format" else "Euler a" if alias == "sampler_name" else value
        assert validator.is_valid({"prompt": "x", **needs, alias: json_value}), alias
        assert not validator.is_valid({"prompt": "x", **needs, alias: json_value, name: json_value}), alias
        with pytest.raises(InvalidInput, match=f"^{alias}: given twice"):
            parser.parse({"prompt": "x", **needs, name: value, alias: value})
    assert parser.parse({"prompt": "x", "steps": 20}).num_inference_steps == 20
    assert parser.parse({"prompt": "x", "init_images": [_png(96, 64)]}).image.size == (96, 64)


def test_schema_is_json_schema_with_the_server_bounds_and_the_model_defaults():
    limits = Limits(max_steps=50, max_side=1536, max_images=4, max_guidance_scale=12.0, max_prompt_length=300)
    schema = RequestParser(limits, SD3).schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert list(props) == list(FIELDS)  # canonical names only
    assert schema["required"] == ["prompt"] and schema["unevaluatedProperties"] is False
    assert props["num_inference_steps"].items() >= {"type": "integer", "minimum": 1, "maximum": 50, "default": 28}.items()
    assert props["width"].items() >= {"type": "integer", "minimum": 64, "maximum": 1536, "multipleOf": 8, "default": 1024}.items()
    assert props["num_images"]["maximum"] == 4 and props["guidance_scale"]["maximum"] == 12.0
    assert props["guidance_scale"]["default"] == 7.0 and props["prompt"]["maxLength"] == 300
    assert props["high_noise_frac"].items() >= {"exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0}.items()
    assert props["scheduler"]["anyOf"][0]["enum"] == ["Euler", "Heun"]  # the flow-matching samplers only
    assert props["format"]["enum"] == ["png", "jpeg", "jpg", "webp"]
    assert props["refiner"]["anyOf"][0] == {"const": "none", "type": "string"}  # no refiner loaded
    assert "$ref" not in str(schema)  # self-contained: it can be put into any document
    sdxl = RequestParser(Limits(max_steps=20), SDXL).schema()["properties"]
    assert sdxl["num_inference_steps"]["maximum"] == sdxl["num_inference_steps"]["default"] == 20
    assert sdxl["refiner"]["anyOf"][0]["enum"] == ["none", "ensemble", "refine"] and sdxl["refiner"]["default"] == "ensemble"
    assert len(sdxl["scheduler"]["anyOf"][0]["enum"]) > 10


def test_a_request_the_schema_accepts_is_parsed_and_one_it_refuses_is_refused():
    class Catalog:
        def exists(self, name):
            return name == "trex"

        def names(self):
            return ["trex"]

    parser = RequestParser(Limits(max_steps=50), SDXL, Catalog())
    validator = jsonschema.Draft202012Validator(parser.schema())
    request = {
        "prompt": "a dog", "negative_prompt": "blur", "prompt_2": "a dog, photo", "width": 768, "height": 512,
        "num_inference_steps": 40, "guidance_scale": 6.0, "seed": 42, "num_images": 2, "scheduler": "DPM++ 2M Karras",
        "refiner": "refine", "refiner_strength": 0.25, "high_noise_frac": 0.7, "original_size": [1024, 1024],
        "crops_coords_top_left": [0, 0], "target_size": [768, 512], "format": "jpeg", "quality": 80,
        "loras": [{"name": "trex", "scale": 0.5}], "image": _png(), "strength": 0.9,
    }
    assert list(validator.iter_errors(request)) == []
    r = parser.parse(request)
    assert (r.width, r.height, r.num_inference_steps, r.scheduler, r.refiner) == (768, 512, 40, "DPM++ 2M Karras", RefinerMode.REFINE)
    assert (r.target_size, r.loras, r.strength, r.image.size) == ((768, 512), (("trex", 0.5),), 0.9, (768, 512))
    for change in [{"num_inference_steps": 51}, {"width": 770}, {"tiling": True}, {"format": "gif"}, {"seed": 1.5},
                   {"loras": [{"name": "trex", "scale": 3}]}, {"high_noise_frac": 1}, {"target_size": [1]}]:
        assert not validator.is_valid({**request, **change}), change
        with pytest.raises(InvalidInput):
            parser.parse({**request, **change})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"width": 1001}, "instances[1].width: must be a multiple of 8 from 64 to 2048, got 1001"),
        ({"width": "1001"}, "instances[1].width: must be a multiple of 8 from 64 to 2048, got '1001'"),
        ({"steps": 0}, "instances[1].steps: must be an integer from 1 to 100, got 0"),
        ({"cfg_scale": True}, "instances[1].cfg_scale: must be a finite number in [0.0, 30.0], got True"),
        ({"num_outputs": "nan"}, "instances[1].num_outputs: must be an integer from 1 to 8, got 'nan'"),
        ({"target_size": "[512, 0]"}, "instances[1].target_size: must be a list of two integers from 1 to 16384, got '[512, 0]'"),
        ({"refiner": 1}, "instances[1].refiner: must be one of none, ensemble, refine, got 1"),
        ({"sampler_name": 3}, "instances[1].sampler_name: must be a scheduler name, got 3"),
        ({"prompt": None}, "instances[1].prompt: required field is missing"),
        ({"negative_prompt": "x" * 2001}, "instances[1].negative_prompt: 2001 characters is over the limit of 2000"),
        ({"loras": '[{"name": "a", "scale": "3"}]'}, "instances[1].loras[0].name: no adapter named 'a'; available: none"),
    ],
)
def test_messages_are_sdserves_own_and_name_the_field_as_spelled(values, message):
    with pytest.raises(InvalidInput) as err:
        RequestParser(Limits(), SDXL).parse({"prompt": "x", **values}, "instances[1].")
    assert err.value.reason == message


def test_numbers_as_strings_but_not_booleans_and_lists_as_json_text():
    class Catalog:
        def exists(self, name):
            return True

        def names(self):
            return []

    parser = RequestParser(Limits(), SDXL, Catalog())
    r = parser.parse({"prompt": "x", "seed": "7", "quality": "1e2", "width": " 512 ", "high_noise_frac": "0.5",
                      "original_size": '["512", 512.0]', "loras": '["a", {"name": "b", "scale": "-0.5"}]'})
    assert (r.seed, r.quality, r.width, r.high_noise_frac, r.original_size) == (7, 100, 512, 0.5, (512, 512))
    assert r.loras == (("a", 1.0), ("b", -0.5))
    for values in [{"seed": True}, {"quality": False}, {"original_size": [True, 1]}, {"guidance_scale": "-inf"},
                   {"loras": [{"name": "a", "scale": True}]}, {"loras": "[oops"}]:
        with pytest.raises(InvalidInput, match="must be"):
            parser.parse({"prompt": "x", **values})
    assert parser.parse({"prompt": "x", "refiner": True}).refiner is RefinerMode.ENSEMBLE
    assert parser.parse({"prompt": "x", "refiner": "REFINE"}).refiner is RefinerMode.REFINE
    assert parser.parse({"prompt": "x", "width": None, "format": None}).width == 1024  # null: the default
