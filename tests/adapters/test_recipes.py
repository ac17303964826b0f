"""Adapter recipes (``sdserve.json`` beside a LoRA's weights) and a server with one adapter fused
into its weights (``--fuse_lora``): recipes fill the fields a request leaves out, are validated
like requests at start-up, are listed in the model metadata; a fused server gives the image an
unfused one gives with that adapter named at the same scale."""

import base64
import json
import shutil

import httpx
import pytest
from kserve.errors import InvalidInput

from helpers.images import b64_image, decode_png, make_image
from helpers.oracle import TOLERANCE, LocalEngine, diff_p99, max_diff
from sdserve.adapters import Adapters
from sdserve.protocol.image_encoding import read_metadata
from sdserve.request.fields import FIELDS
from sdserve.request.recipes import RECIPE_FILE, checker
from sdserve.request.types import Limits
from sdserve.request.validation import RequestParser

TREX = {"scheduler": "euler a", "num_inference_steps": 3, "guidance_scale": 1, "width": 128, "height": 128,
        "scale": 0.6, "description": "tiny T. rex style", "license": "CC0-1.0"}
PIXEL = {"steps": 2, "guidance_scale": 1.0, "scale": 0.5}  # an alias is a known key too
# as the metadata lists them: canonical names and values, as validation resolved them
TREX_LISTED = {"scheduler": "Euler a", "num_inference_steps": 3, "guidance_scale": 1.0, "width": 128, "height": 128,
               "scale": 0.6, "description": "tiny T. rex style", "license": "CC0-1.0"}
PIXEL_LISTED = {"num_inference_steps": 2, "guidance_scale": 1.0, "scale": 0.5}
BROKEN = {  # adapter: (its sdserve.json, what the refusal says)
    "badjson": ('{"num_inference_steps": 4,', "not valid JSON"),
    "unknown": ('{"sampler": "Euler"}', "sampler: not a key a recipe may set"),
    "zero": ('{"num_inference_steps": 0}', "num_inference_steps: must be an integer from 1 to 100, got 0"),
    "flow": ('{"scheduler": "FlowMatchEulerDiscreteScheduler"}', "scheduler: unknown scheduler"),
    "script": ('{"guidance_scale": "__import__(\'os\')"}', "guidance_scale: must be a finite number"),
}
TREX_RESOLVED = {"num_inference_steps": 3, "guidance_scale": 1.0, "scheduler": "Euler a", "width": 128, "height": 128}


@pytest.fixture(scope="module")
def model_dir(models, tmp_path_factory):
    """The sdxl-loras model with recipes: trex and pixel (which disagree on steps), plain (none) and
    one adapter per broken recipe."""
    root = tmp_path_factory.mktemp("recipes") / "sdxl-loras"
    shutil.copytree(models["sdxl-loras"], root)
    loras = root / "loras"
    for name in ("plain", *BROKEN):
        shutil.copytree(loras / "trex", loras / name)
    (loras / "trex" / RECIPE_FILE).write_text(json.dumps(TREX))
    (loras / "pixel" / RECIPE_FILE).write_text(json.dumps(PIXEL))
    for name, (text, _) in BROKEN.items():
        (loras / name / RECIPE_FILE).write_text(text)
    return root


@pytest.fixture(scope="module")
def engine(model_dir):
    adapters = Adapters(model_dir / "loras", rescan_seconds=0)
    made = LocalEngine(model_dir, adapters=adapters)
    adapters.check = checker(Limits(), made.model.capabilities)  # as the server passes it at start-up
    adapters.scan()
    yield made
    made.close()


def resolved(request) -> dict:
    return {name: getattr(request, name) for name in TREX_RESOLVED}


# -- the parser, in process ---------------------------------------------------------------------
def test_a_recipe_fills_the_fields_a_request_leaves_out(engine):
    request = engine.parse({"prompt": "a dinosaur", "loras": ["trex"]})
    assert resolved(request) == TREX_RESOLVED and request.loras == (("trex", 0.6),)
    # v2/gRPC send the list as JSON text; a null field means the default, the recipe's here
    request = engine.parse({"prompt": "a dinosaur", "loras": '[{"name": "trex"}]', "steps": None})
    assert resolved(request) == TREX_RESOLVED and request.loras == (("trex", 0.6),)
    # no adapter, or one without a recipe: the model's own defaults
    for loras in ([], ["plain"]):
        request = engine.parse({"prompt": "a dinosaur", "loras": loras})
        assert request.num_inference_steps == 50 and request.scheduler is None and request.width == 256
    assert engine.parse({"prompt": "x", "loras": ["plain"]}).loras == (("plain", 1.0),)


def test_fields_the_request_gives_win_under_any_alias(engine):
    request = engine.parse({"prompt": "a dinosaur", "loras": [{"name": "trex", "scale": 0.3}], "steps": 5,
                            "cfg_scale": 4, "sampler_name": "ddim", "width": 192})
    assert resolved(request) == {**TREX_RESOLVED, "num_inference_steps": 5, "guidance_scale": 4.0,
                                 "scheduler": "DDIM", "width": 192}
    assert request.loras == (("trex", 0.3),)
    # a start image's size wins over the recipe's sizes
    image = b64_image(make_image(192, 128))
    request = engine.parse({"prompt": "a dinosaur", "loras": ["trex"], "image": image})
    assert (request.width, request.height, request.num_inference_steps) == (192, 128, 3)


def test_recipes_that_disagree_on_a_field_left_out_are_a_400(engine):
    with pytest.raises(InvalidInput) as error:
        engine.parser.parse({"prompt": "x", "loras": ["trex", "pixel"]}, "instances[1].")
    assert error.value.reason == ("instances[1].loras: adapters 'trex' and 'pixel' disagree on num_inference_steps "
                                  "(3 vs 2); set it in the request")
    # given in the request, there is nothing to disagree on; guidance_scale they agree on
    request = engine.parse({"prompt": "x", "loras": ["trex", "pixel"], "num_inference_steps": 4})
    assert resolved(request) == {**TREX_RESOLVED, "num_inference_steps": 4}
    assert request.loras == (("trex", 0.6), ("pixel", 0.5))


def test_a_broken_recipe_keeps_its_adapter_out(engine):
    adapters = engine.adapters
    assert adapters.names() == ["pixel", "plain", "trex"]
    for name, (_, reason) in BROKEN.items():
        assert not adapters.exists(name) and adapters.recipe(name) is None
        assert reason in adapters.refused[name], adapters.refused[name]
        with pytest.raises(InvalidInput) as error:
            engine.parse({"prompt": "x", "loras": ["trex", name]})
        refusal = f"loras[1].name: adapter {name!r} is not offered: its sdserve.json is refused"
        assert error.value.reason.startswith(refusal)


@pytest.mark.skipif(not {"eta", "timestep_spacing", "timesteps"} <= FIELDS.keys(), reason="no sampler settings")
def test_recipe_fields_that_would_contradict_the_request_stay_out(engine, model_dir, tmp_path):
    loras = tmp_path / "loras"
    for name, recipe in {"tcd": {"scheduler": "TCD", "eta": 0.5, "num_inference_steps": 4, "guidance_scale": 1.0},
                         "dmd": {"timesteps": [999, 749, 499, 249], "guidance_scale": 1.0}}.items():
        shutil.copytree(model_dir / "loras" / "plain", loras / name)
        (loras / name / RECIPE_FILE).write_text(json.dumps(recipe))
    caps = engine.model.capabilities
    adapters = Adapters(loras, check=checker(Limits(), caps))
    assert adapters.names() == ["dmd", "tcd"], adapters.refused
    parse = RequestParser(Limits(), caps, adapters).parse
    r = parse({"prompt": "x", "loras": ["tcd"]})
    assert (r.scheduler, r.eta, r.num_inference_steps, r.guidance_scale) == ("TCD", 0.5, 4, 1.0)
    assert parse({"prompt": "x", "loras": ["tcd"], "sampler_name": "tcd"}).eta == 0.5  # its own sampler: kept
    r = parse({"prompt": "x", "loras": ["tcd"], "scheduler": "euler"})  # another sampler: not its eta
    assert (r.scheduler, r.eta, r.num_inference_steps) == ("Euler", None, 4)
    r = parse({"prompt": "x", "loras": ["dmd"]})
    assert (r.timesteps, r.num_inference_steps) == ((999, 749, 499, 249), 4)
    for given in ({"steps": 6}, {"timestep_spacing": "trailing", "num_inference_steps": 6},
                  {"image": b64_image(make_image(128, 128))}):  # a schedule of the request's own
        r = parse({"prompt": "x", "loras": ["dmd"], **given})
        assert r.timesteps is None and r.num_inference_steps == (50 if "image" in given else 6)


def test_the_recipe_scale_gives_the_image_of_the_explicit_scale(engine):
    common = {"prompt": "a dinosaur", "seed": 4}
    from_recipe = engine.images({**common, "loras": ["trex"]})[0]
    explicit = engine.images({**common, **TREX_RESOLVED, "loras": [{"name": "trex", "scale": 0.6}]})[0]
    assert from_recipe.shape == (128, 128, 3) and (from_recipe == explicit).all()


# -- real servers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir, start_server):
    return start_server("--model_dir", str(model_dir), model_name="recipes")


@pytest.fixture(scope="module")
def fused(model_dir, start_server):
    return start_server("--model_dir", str(model_dir), "--fuse_lora", "trex:0.8", model_name="fused")


def one(server, values: dict) -> dict:
    r = server.predict({"instances": [values]})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_recipes_are_listed_and_broken_ones_logged(server):
    v1 = httpx.get(f"{server.url}/v1/models/recipes").json()
    assert v1["adapters"] == ["pixel", "plain", "trex"] and "fused_lora" not in v1
    assert v1["recipes"] == {"pixel": PIXEL_LISTED, "trex": TREX_LISTED}
    assert httpx.get(f"{server.url}/v2/models/recipes").json()["parameters"]["recipes"] == v1["recipes"]
    log = server.log()
    for name, (_, reason) in BROKEN.items():
        line = next(line for line in log.splitlines() if f"LoRA adapter {name} not offered" in line)
        assert f"{name}/{RECIPE_FILE} refused" in line and reason in line, line


def test_responses_and_png_metadata_show_the_resolved_values(server):
    prediction = one(server, {"prompt": "a dinosaur", "seed": 3, "loras": ["trex"]})
    parameters = prediction["parameters"]
    assert {k: parameters[k] for k in TREX_RESOLVED} == TREX_RESOLVED
    assert parameters["loras"] == [{"name": "trex", "scale": 0.6}]
    png = base64.b64decode(prediction["image"]["b64"])
    stored = read_metadata(png)
    assert {k: stored[k] for k in TREX_RESOLVED} == TREX_RESOLVED and stored["loras"] == parameters["loras"]
    # the stored parameters alone reproduce the image: the recipe is no longer needed
    again = one(server, {k: v for k, v in stored.items() if k not in ("model", "refiner")})
    assert base64.b64decode(again["image"]["b64"]) == png
    v2 = server.infer({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a dinosaur"]}],
                       "parameters": {"seed": 3, "loras": '["trex"]'}})
    assert v2.status_code == 200 and base64.b64decode(v2.json()["outputs"][0]["data"][0]) == png


def test_the_server_refuses_disagreeing_recipes(server):
    r = server.predict({"instances": [{"prompt": "x", "loras": ["pixel", "trex"]}]})
    assert r.status_code == 400
    assert r.json()["error"] == ("instances[0].loras: adapters 'pixel' and 'trex' disagree on num_inference_steps "
                                 "(2 vs 3); set it in the request")


def test_a_fused_adapter_gives_the_image_of_the_named_one(server, fused):
    listed = httpx.get(f"{fused.url}/v1/models/fused").json()
    assert listed["fused_lora"] == {"name": "trex", "scale": 0.8, "recipe": TREX_LISTED}
    assert listed["adapters"] == ["pixel", "plain"] and listed["recipes"] == {"pixel": PIXEL_LISTED}
    assert "fused LoRA adapter trex (scale 0.8)" in fused.log()
    # its recipe is the fused server's default; the unfused one gets it by naming the adapter
    common = {"prompt": "a dinosaur", "seed": 7}
    ours = one(fused, common)
    assert {k: ours["parameters"][k] for k in TREX_RESOLVED} == TREX_RESOLVED and "loras" not in ours["parameters"]
    named = one(server, {**common, "loras": [{"name": "trex", "scale": 0.8}]})
    a, b = decode_png(ours["image"]["b64"]), decode_png(named["image"]["b64"])
    assert a.shape == (128, 128, 3) and diff_p99(a, b) <= TOLERANCE, (diff_p99(a, b), max_diff(a, b))
    plain = decode_png(one(server, {**common, **TREX_RESOLVED})["image"]["b64"])
    assert max_diff(a, plain) > 2 * TOLERANCE  # the fused weights do differ from the base's
    # explicit fields win over the fused default; other adapters apply on top (their recipe over the default)
    assert one(fused, {**common, "steps": 2})["parameters"]["num_inference_steps"] == 2
    on_top = one(fused, {**common, "loras": ["pixel"]})
    assert on_top["parameters"]["num_inference_steps"] == 2 and on_top["parameters"]["scheduler"] == "Euler a"
    both = one(server, {**common, "steps": 2, "loras": [{"name": "trex", "scale": 0.8}, "pixel"]})
    a, b = decode_png(on_top["image"]["b64"]), decode_png(both["image"]["b64"])
    assert diff_p99(a, b) <= TOLERANCE, (diff_p99(a, b), max_diff(a, b))


def test_the_fused_adapter_cannot_be_named(fused):
    r = fused.predict({"instances": [{"prompt": "x", "loras": ["pixel", {"name": "trex", "scale": 1}]}]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("instances[0].loras[1].name: adapter 'trex' is fused into the model "
                                        "(--fuse_lora trex:0.8)")


@pytest.mark.parametrize("flag, error", [
    ("dragon", "--fuse_lora dragon: no adapter named 'dragon'"),
    ("zero", "--fuse_lora zero: its sdserve.json is refused: num_inference_steps: must be"),
    ("trex:5", "--fuse_lora: scale must be a number from -2.0 to 2.0, got '5'"),
    ("trex:x", "--fuse_lora: scale must be a number"),
])
@pytest.mark.slow
def test_a_bad_fuse_lora_stops_the_start(model_dir, start_server, flag, error):
    server = start_server("--model_dir", str(model_dir), "--fuse_lora", flag, wait=False)
    assert server.proc.wait(120) == 2
    assert error in server.log(), server.log()[-3000:]
