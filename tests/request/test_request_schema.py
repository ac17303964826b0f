"""The pydantic model of the request fields and its JSON Schema: every alias means its field for the
parser and the schema alike, the schema carries the server's bounds and the model's defaults, what
it accepts parses and what it refuses is refused, and messages are sdserve's own, naming the field
as it was spelled."""

import base64
import io

import jsonschema
import pytest
from kserve.errors import InvalidInput
from PIL import Image

from helpers.capabilities import SD3, SDXL
from sdserve.request.fields import ALIASES, FIELDS
from sdserve.request.types import Limits, RefinerMode
from sdserve.request.validation import RequestParser


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
