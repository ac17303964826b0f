"""``POST /openai/v1/images/edits`` through the real ``openai`` SDK (sync and async) against a real
server: masks in OpenAI's convention (transparent = repaint) give the same pixels as v1's (white =
repaint), an image's own transparency is a mask, an opaque image alone is img2img, the SDK's
multipart shapes (image[], key[], key[][x], "true"/"false") are understood, and bad input is a 400
in OpenAI's error shape naming the field."""

import asyncio
import base64
import io
import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers.images import b64_image, decode_png, encode, make_image, make_mask
from sdserve.protocol.image_encoding import read_metadata

MAX_INPUT_PIXELS = 1_000_000
FAST = {"seed": 5, "num_inference_steps": 4}


def rgba_mask(white: Image.Image) -> Image.Image:
    """OpenAI's form of a white-means-repaint mask: alpha 0 exactly where it is white."""
    alpha = np.where(np.asarray(white) == 255, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([np.zeros_like(alpha)] * 3 + [alpha]), "RGBA")


def with_alpha(image: Image.Image, white: Image.Image) -> Image.Image:
    """``image`` made transparent where ``white`` is white (its RGB values stay in the file)."""
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.asarray(white) == 255, 0, 255).astype(np.uint8), "L"))
    return rgba


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height (and holds no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


IMAGE = make_image(128, 128)
MASK = make_mask(128, 128)  # white (repaint) right half
IMAGE_PNG = encode(IMAGE)


def png_file(image: Image.Image, name: str = "in.png") -> tuple[str, bytes, str]:
    return (name, encode(image), "image/png")


@pytest.fixture(scope="module")
def server(models, start_server):
    # SDXL base with LoRA adapters (no refiner), and a small input limit to test it.
    return start_server("--model_dir", str(models["sdxl-loras"]), "--max_input_pixels", str(MAX_INPUT_PIXELS))


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/openai/v1", api_key="not-checked", max_retries=0, timeout=120)


def pixels(result, i: int = 0) -> np.ndarray:
    return decode_png(result.data[i].b64_json)


def meta(result, i: int = 0) -> dict:
    return read_metadata(base64.b64decode(result.data[i].b64_json))


def test_edit_with_a_mask(client):
    result = client.images.edit(image=png_file(IMAGE), mask=png_file(rgba_mask(MASK), "mask.png"), prompt="a fox",
                                n=2, size="128x128", extra_body=FAST)
    assert len(result.data) == 2 and result.size == "128x128" and result.output_format == "png"
    assert [d.model_extra["seed"] for d in result.data] == [5, 6]
    assert all(pixels(result, i).shape == (128, 128, 3) for i in range(2))
    assert meta(result)["mode"] == "inpaint" and meta(result)["strength"] == 1.0


def test_an_opaque_image_without_a_mask_is_img2img(client):
    result = client.images.edit(image=png_file(IMAGE), prompt="a fox", size="auto",
                                extra_body={**FAST, "strength": 0.5})
    assert meta(result)["mode"] == "img2img" and meta(result)["strength"] == 0.5
    assert pixels(result).shape == (128, 128, 3)  # "auto": the image's size


def test_transparent_pixels_of_the_image_are_the_mask(client):
    alone = client.images.edit(image=png_file(with_alpha(IMAGE, MASK)), prompt="a fox", extra_body=FAST)
    masked = client.images.edit(image=png_file(IMAGE), mask=png_file(rgba_mask(MASK)), prompt="a fox",
                                extra_body=FAST)
    assert meta(alone)["mode"] == "inpaint"
    assert np.array_equal(pixels(alone), pixels(masked))


def test_a_list_of_images_is_sent_as_image_brackets_and_the_first_is_used(client):
    single = client.images.edit(image=png_file(IMAGE), prompt="a fox", extra_body=FAST)
    listed = client.images.edit(image=[png_file(IMAGE), png_file(make_image(128, 128, seed=9))], prompt="a fox",
                                extra_body=FAST)
    assert np.array_equal(pixels(single), pixels(listed))


def test_same_pixels_as_v1_with_the_white_mask(client, server):
    v1 = server.predict({"instances": [{"prompt": "a fox", "image": b64_image(IMAGE), "mask": b64_image(MASK),
                                        **FAST}]})
    assert v1.status_code == 200, v1.text
    expected = decode_png(v1.json()["predictions"][0]["image"]["b64"])
    openai_mask = client.images.edit(image=png_file(IMAGE), mask=png_file(rgba_mask(MASK)), prompt="a fox",
                                     size="128x128", extra_body=FAST)
    # a mask with nothing transparent (here: no alpha channel) is read as grayscale, white = repaint
    gray_mask = client.images.edit(image=png_file(IMAGE), mask=png_file(MASK), prompt="a fox", extra_body=FAST)
    assert np.array_equal(pixels(openai_mask), expected)
    assert np.array_equal(pixels(gray_mask), expected)


def test_sdk_multipart_shapes_of_lists_objects_and_booleans(client):
    loras = [{"name": "trex", "scale": 0.5}, {"name": "pixel", "scale": 1.0}]
    as_objects = client.images.edit(  # loras[][name], loras[][scale], original_size[], refiner=false
        image=png_file(IMAGE), prompt="a fox", quality="low", output_format="webp", input_fidelity="high",
        user="u", stream=False, background="opaque",
        extra_body={**FAST, "loras": loras, "original_size": [256, 192], "refiner": False, "guidance_scale": 6.5},
    )
    as_json = client.images.edit(
        image=png_file(IMAGE), prompt="a fox", output_format="webp",
        extra_body={**FAST, "loras": json.dumps(loras), "original_size": "[256, 192]", "guidance_scale": "6.5"},
    )
    assert as_objects.output_format == "webp"
    assert base64.b64decode(as_objects.data[0].b64_json) == base64.b64decode(as_json.data[0].b64_json)
    names = client.images.edit(image=png_file(IMAGE), prompt="a fox", extra_body={**FAST, "loras": ["trex"]})
    assert meta(names)["loras"] == [{"name": "trex", "scale": 1.0}]


def test_async_client(server):
    from openai import AsyncOpenAI

    async def edit():
        client = AsyncOpenAI(base_url=f"{server.url}/openai/v1", api_key="k", max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*[
                client.images.edit(image=png_file(IMAGE), mask=png_file(rgba_mask(MASK)), prompt="a fox",
                                   size="128x128", extra_body={**FAST, "seed": seed})
                for seed in (1, 2)
            ])

    first, second = asyncio.run(edit())
    assert first.data[0].model_extra["seed"] == 1 and second.data[0].model_extra["seed"] == 2
    assert pixels(first).shape == (128, 128, 3) and not np.array_equal(pixels(first), pixels(second))


BAD = [
    # (edit() arguments, param, message)
    ({"image": ("x.png", b"not an image", "image/png")}, "image", "image: not a readable PNG, JPEG or WebP image"),
    ({"mask": png_file(rgba_mask(make_mask(64, 64)))}, "mask", "mask: 64x64 differs from the image's size 128x128"),
    ({"extra_body": {"strength": 1.5}}, "strength", "strength: must be a finite number in (0.0, 1.0]"),
    ({"extra_body": {"tiling": "true"}}, "tiling", "tiling: unknown field; allowed:"),
    ({"image": ("big.png", png_header(2000, 2000), "image/png")}, "image",
     f"image: 2000x2000 = 4000000 pixels is over the server limit of {MAX_INPUT_PIXELS} pixels"),
    ({"image": ("bomb.png", png_header(20000, 20000), "image/png")}, "image", "image: the image is larger than"),
    ({"mask": ("big.png", png_header(2000, 2000), "image/png")}, "mask", "mask: 2000x2000 = 4000000 pixels"),
    ({"response_format": "url"}, "response_format", "use 'b64_json'"),
    ({"background": "transparent"}, "background", "background: 'transparent' is not supported"),
    ({"extra_body": {"num_images": 2}}, "num_images", "num_images: unknown field"),  # n is OpenAI's name
    ({"extra_body": {"loras": [{"name": "trex", "scale": 0.5}, {"name": "pixel"}]}}, "loras",
     "loras: objects with different keys do not survive form encoding"),
]


@pytest.mark.parametrize("kwargs,param,message", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(client, kwargs, param, message):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(**{"image": png_file(IMAGE), "prompt": "x", **kwargs, "extra_body": {
            **FAST, **kwargs.get("extra_body", {})}})
    assert err.value.status_code == 400
    assert err.value.body == {"message": err.value.body["message"], "type": "invalid_request_error",
                              "param": param, "code": None}
    assert message in err.value.body["message"]


def test_bad_bodies_and_models_then_the_server_still_serves(client, server):
    import openai

    url = f"{server.url}/openai/v1/images/edits"
    no_image = httpx.post(url, files={"prompt": (None, "x")}, headers={"x-request-id": "e-1"}, timeout=60)
    assert no_image.status_code == 400 and no_image.headers["x-request-id"] == "e-1"
    assert no_image.json()["error"]["param"] == "image"
    assert no_image.json()["error"]["message"].startswith("image: required")
    as_json = httpx.post(url, json={"prompt": "x", "image": b64_image(IMAGE)}, timeout=60)
    assert as_json.status_code == 400 and "must be multipart/form-data" in as_json.json()["error"]["message"]
    twice = httpx.post(url, files=[("prompt", (None, "x")), ("seed", (None, "1")), ("seed", (None, "2")),
                                   ("image", ("in.png", IMAGE_PNG, "image/png"))], timeout=60)
    assert twice.status_code == 400 and twice.json()["error"]["message"].startswith("seed: given more than once")
    with pytest.raises(openai.NotFoundError) as err:
        client.images.edit(image=png_file(IMAGE), prompt="x", model="gpt-image-1")
    assert err.value.body["code"] == "model_not_found"
    # curl's shape (-F image=@in.png -F prompt=... -F seed=5) works, and the server is still well
    ok = httpx.post(url, files=[("image", ("in.png", IMAGE_PNG, "image/png")), ("prompt", (None, "a fox")),
                                ("seed", (None, "5")), ("num_inference_steps", (None, "4"))], timeout=120)
    assert ok.status_code == 200, ok.text
    assert decode_png(ok.json()["data"][0]["b64_json"]).shape == (128, 128, 3)
    assert Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"]))).format == "PNG"
