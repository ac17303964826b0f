"""KServe v1 against a real server: the requests existing runtimes' clients send, unchanged."""

import concurrent.futures

import httpx
import numpy as np
import pytest

from helpers.images import decode_png

FAST = {"num_inference_steps": 4}


def test_sdxl_on_openshift_request_as_written(sdxl_server):
    """The SDXL-on-OpenShift runtime's request: 1024x1024, 50 steps, a base/refiner split."""
    payload = {
        "instances": [
            {
                "prompt": "Astronaut on a horse, detailed",
                "guidance_scale": 8.0,
                "num_inference_steps": 50,
                "crops_coords_top_left": [256, 0],
                "width": 1024,
                "height": 1024,
                "denoising_limit": 0.8,
            }
        ]
    }
    r = sdxl_server.predict(payload)
    assert r.status_code == 200, r.text
    prediction = r.json()["predictions"][0]
    assert prediction["image"]["format"] == "PNG"
    assert decode_png(prediction["image"]["b64"]).shape == (1024, 1024, 3)
    params = prediction["parameters"]
    assert params["refiner"] == "ensemble" and params["high_noise_frac"] == 0.8
    assert params["crops_coords_top_left"] == [256, 0] and params["guidance_scale"] == 8.0


def test_text_to_image_demo_and_torchserve_style_requests(sdxl_server):
    demo = sdxl_server.predict({"instances": [{"prompt": "a red car", "num_inference_steps": 25}]})
    assert demo.status_code == 200, demo.text
    assert decode_png(demo.json()["predictions"][0]["image"]["b64"]).shape == (256, 256, 3)
    torchserve = sdxl_server.predict({"instances": [{"data": "a red car"}], "parameters": FAST})
    assert torchserve.status_code == 200, torchserve.text
    assert torchserve.json()["predictions"][0]["prompt"] == "a red car"


def test_string_instances_with_shared_parameters_and_several_images(sdxl_server):
    r = sdxl_server.predict(
        {"instances": ["a cat", {"prompt": "a dog", "num_images": 2, "seed": 100}], "parameters": {**FAST, "seed": 7}}
    )
    assert r.status_code == 200, r.text
    cat, dog = r.json()["predictions"]
    assert cat["image"]["seed"] == 7 and [i["seed"] for i in cat["images"]] == [7]
    assert [i["seed"] for i in dog["images"]] == [100, 101] and dog["image"] == dog["images"][0]
    assert cat["parameters"]["num_inference_steps"] == 4


def test_random_seeds_are_returned_and_reproduce_the_image(sdxl_server):
    first = sdxl_server.predict({"instances": [{"prompt": "a boat", **FAST}]}).json()["predictions"][0]["image"]
    assert first["seed"] >= 0
    again = sdxl_server.predict({"instances": [{"prompt": "a boat", "seed": first["seed"], **FAST}]})
    assert again.json()["predictions"][0]["image"]["b64"] == first["b64"]
    other = sdxl_server.predict({"instances": [{"prompt": "a boat", "seed": first["seed"] + 1, **FAST}]})
    assert other.json()["predictions"][0]["image"]["b64"] != first["b64"]


def test_output_formats(sdxl_server):
    r = sdxl_server.predict({"instances": [{"prompt": "x", "format": "jpeg", "quality": 80, **FAST},
                                           {"prompt": "x", "format": "webp", **FAST}]})
    assert r.status_code == 200, r.text
    jpeg, webp = r.json()["predictions"]
    assert jpeg["image"]["format"] == "JPEG" and decode_png(jpeg["image"]["b64"]).shape == (256, 256, 3)
    assert webp["image"]["format"] == "WEBP" and decode_png(webp["image"]["b64"]).shape == (256, 256, 3)


def test_concurrent_requests_are_batched_and_match_unbatched_images(sdxl_server):
    seeds = [11, 12, 13, 14]

    def one(seed):
        return sdxl_server.predict({"instances": [{"prompt": f"a house {seed}", "seed": seed, **FAST}]}).json()

    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(one, seeds))
    batch_sizes = [p["predictions"][0]["timings"]["batch_images"] for p in together]
    assert max(batch_sizes) > 1, batch_sizes  # the 100 ms wait window gathered them
    for seed, response in zip(seeds, together):
        alone = one(seed)["predictions"][0]
        assert alone["timings"]["batch_images"] == 1
        a = decode_png(response["predictions"][0]["image"]["b64"]).astype(int)
        b = decode_png(alone["image"]["b64"]).astype(int)
        assert np.abs(a - b).max() <= 2


BAD_REQUESTS = [
    ({"instances": [{"prompt": "x", "num_inference_steps": 1000}]}, "instances[0].num_inference_steps: must be an integer from 1 to 100"),
    ({"instances": [{"prompt": "x"}, {"prompt": "y", "width": 333}]}, "instances[1].width: must be a multiple of 8"),
    ({"instances": [{"prompt": "x", "sampler": "Euler"}]}, "instances[0].sampler: unknown field"),
    ({"instances": [{"prompt": "x"}], "parameters": {"cfg": 7}}, "parameters.cfg: unknown field"),
    ({"instances": [{"negative_prompt": "x"}]}, "instances[0].prompt: required field is missing"),
    ({"instances": []}, "instances: must be a non-empty list"),
    ({"inputs": ["x"]}, "inputs: unknown top-level field"),
    ({"instances": [42]}, "instances[0]: must be a prompt string or an object"),
    ({"instances": [{"prompt": "x", "scheduler": "magic"}]}, "instances[0].scheduler: unknown scheduler 'magic'; allowed:"),
    ({"instances": [{"prompt": "x", "guidance_scale": "NaN"}]}, "instances[0].guidance_scale: must be a finite number"),
    ({"instances": [{"prompt": "x", "num_images": 5}, {"prompt": "y", "num_images": 5}]}, "instances: 10 images asked for in one request; the server limit is 8"),
    ([1, 2], "request body must be a JSON object"),
]


@pytest.mark.parametrize("payload, message", BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(sdxl_server, payload, message):
    r = sdxl_server.predict(payload)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    ok = sdxl_server.predict({"instances": [{"prompt": "still here", **FAST}]})
    assert ok.status_code == 200


def test_not_json_and_unknown_model(sdxl_server):
    url = f"{sdxl_server.url}/v1/models/sdxl:predict"
    r = httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "Unrecognized request format" in r.json()["error"]
    # curl -d sends a form content type: the body is still read as JSON
    r = httpx.post(url, content=b"{oops", headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 400 and "request body is not valid JSON" in r.json()["error"]
    r = httpx.post(url, content=b'{"instances": ["x"], "parameters": {"num_inference_steps": 2}}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200
    r = httpx.post(f"{sdxl_server.url}/v1/models/other:predict", json={"instances": ["x"]}, timeout=30)
    assert r.status_code == 404


def test_request_id_is_echoed(sdxl_server):
    r = sdxl_server.predict({"instances": [{"prompt": "x", **FAST}]}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(sdxl_server.predict({"instances": [{"prompt": "x", **FAST}]}).headers["x-request-id"]) == 32


def test_model_listing_and_readiness(sdxl_server):
    assert httpx.get(f"{sdxl_server.url}/v1/models").json() == {"models": ["sdxl"]}
    model = httpx.get(f"{sdxl_server.url}/v1/models/sdxl").json()
    assert model == {"name": "sdxl", "ready": True, "pipeline": "StableDiffusionXLPipeline", "refiner": True,
                     "default_size": [256, 256], "adapters": [], "inputs": ["text", "image", "mask"]}
    assert httpx.get(f"{sdxl_server.url}/v1/models/other").status_code == 404


def test_request_schema_is_served_and_in_the_openapi_document(sdxl_server):
    import jsonschema

    schema = httpx.get(f"{sdxl_server.url}/v1/models/sdxl/schema").json()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"prompt": "a fox", "num_inference_steps": 20, "image": "aGk=", "strength": 0.5})
    assert not validator.is_valid({"prompt": "a fox", "num_inference_steps": 1000})
    assert not validator.is_valid({"prompt": "a fox", "tiling": True})
    assert schema["properties"]["num_inference_steps"]["maximum"] == 100  # the server's --max_steps
    assert "Euler a" in str(schema["properties"]["scheduler"])
    assert httpx.get(f"{sdxl_server.url}/v1/models/other/schema").status_code == 404
    document = httpx.get(f"{sdxl_server.url}/openapi.json").json()
    assert document["components"]["schemas"]["GenerationParameters"] == schema
