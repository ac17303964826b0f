"""Image inputs over the v1 route, end to end: the shapes other runtimes' clients send
(replicate's cog, AUTOMATIC1111), sizes taken from the image, models that need an image
(an SDXL refiner alone, an inpainting model), and every bad input as a 400 naming the field."""

import base64
import struct
import zlib

import httpx
import numpy as np
import pytest

from helpers.images import b64_image, decode_png, make_image, make_mask

IMAGE = b64_image(make_image(128, 128))
MASK = b64_image(make_mask(128, 128))
FAST = {"num_inference_steps": 4, "seed": 7}


def predict_one(server, instance: dict) -> dict:
    r = server.predict({"instances": [instance]})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height but holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_img2img_and_inpaint_over_v1(sdxl_server):
    img2img = predict_one(sdxl_server, {"prompt": "a fox", "image": IMAGE, "strength": 0.6, **FAST})
    assert img2img["parameters"]["mode"] == "img2img" and img2img["parameters"]["strength"] == 0.6
    assert decode_png(img2img["image"]["b64"]).shape == (128, 128, 3)
    inpaint = predict_one(sdxl_server, {"prompt": "a fox", "image": IMAGE, "mask": MASK, **FAST})
    assert inpaint["parameters"]["mode"] == "inpaint" and inpaint["parameters"]["strength"] == 1.0
    assert inpaint["parameters"]["refiner"] == "none"  # inpainting runs on the base model
    metrics = httpx.get(f"{sdxl_server.url}/metrics").text
    assert 'sdserve_images_from_image_total{mode="img2img"}' in metrics
    assert 'sdserve_images_from_image_total{mode="inpaint"}' in metrics


def test_cog_and_automatic1111_shapes(sdxl_server):
    ours = predict_one(sdxl_server, {"prompt": "a fox", "image": IMAGE, "strength": 0.5, "num_images": 1,
                                     "num_inference_steps": 4, "guidance_scale": 6, "seed": 3, "refiner": "none"})
    cog = predict_one(sdxl_server, {"prompt": "a fox", "image": IMAGE, "prompt_strength": 0.5, "num_outputs": 1,
                                    "num_inference_steps": 4, "guidance_scale": 6, "seed": 3, "refiner": "none"})
    a1111 = predict_one(sdxl_server, {"prompt": "a fox", "init_images": [f"data:image/png;base64,{IMAGE}"],
                                      "denoising_strength": 0.5, "steps": 4, "cfg_scale": 6,
                                      "seed": 3, "refiner": "none"})
    pixels = [decode_png(p["image"]["b64"]) for p in (ours, cog, a1111)]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_images_and_data_urls(sdxl_server, fmt):
    data = b64_image(make_image(128, 128), fmt)
    out = predict_one(sdxl_server, {"prompt": "x", "image": f"data:image/{fmt.lower()};base64,{data}", **FAST})
    assert decode_png(out["image"]["b64"]).shape == (128, 128, 3)


def test_size_comes_from_the_image_rounded_down_or_from_the_request(sdxl_server):
    odd = b64_image(make_image(133, 101))
    out = predict_one(sdxl_server, {"prompt": "x", "image": odd, **FAST})
    assert (out["parameters"]["width"], out["parameters"]["height"]) == (128, 96)
    wide = b64_image(make_image(256, 128))
    out = predict_one(sdxl_server, {"prompt": "x", "image": wide, "width": 128, **FAST})
    assert (out["parameters"]["width"], out["parameters"]["height"]) == (128, 64)  # aspect kept
    out = predict_one(sdxl_server, {"prompt": "x", "image": wide, "mask": b64_image(make_mask(256, 128)),
                                    "width": 96, "height": 96, **FAST})
    assert decode_png(out["image"]["b64"]).shape == (96, 96, 3)


BAD = [
    ({"image": "bm90IGFuIGltYWdl"}, "instances[0].image: not a readable PNG, JPEG or WebP image"),
    ({"image": "***"}, "instances[0].image: not valid base64"),
    ({"image": base64.b64encode(png_header(9000, 9000)).decode()},
     "instances[0].image: 9000x9000 = 81000000 pixels is over the server limit of 16777216"),
    ({"image": base64.b64encode(png_header(30000, 30000)).decode()}, "instances[0].image: the image is larger than"),
    ({"image": b64_image(make_image(128, 128), "GIF")}, "instances[0].image: not a readable PNG, JPEG or WebP"),
    ({"image": IMAGE, "mask": b64_image(make_mask(64, 64))}, "instances[0].mask: 64x64 differs from the image's size 128x128"),
    ({"mask": MASK}, "instances[0].mask: a mask needs an image"),
    ({"image": IMAGE, "strength": 1.5}, "instances[0].strength: must be a finite number in (0.0, 1.0]"),
    ({"image": IMAGE, "denoising_strength": 0}, "instances[0].denoising_strength: must be a finite number in (0.0, 1.0]"),
    ({"strength": 0.5}, "instances[0].strength: applies to a start image"),
    ({"image": IMAGE, "strength": 0.1, "num_inference_steps": 4}, "instances[0].strength: 0.1 of 4 steps leaves no"),
    ({"init_images": [IMAGE, IMAGE]}, "instances[0].init_images: give exactly one image, got 2"),
    ({"image": IMAGE, "mask": MASK, "refiner": "ensemble"}, "instances[0].refiner: inpainting (a mask) runs on the base"),
    ({"image": b64_image(make_image(32, 32))}, "instances[0].image: 32x32 is smaller than the server minimum"),
]


@pytest.mark.parametrize("values, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_image_input_is_a_400_naming_the_field(sdxl_server, values, message):
    r = sdxl_server.predict({"instances": [{"prompt": "x", **values}]})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert sdxl_server.predict({"instances": ["still serving"], "parameters": FAST}).status_code == 200


@pytest.mark.slow
def test_a_refiner_alone_serves_image_to_image(models, start_server):
    server = start_server("--model_dir", str(models["refiner-only"]), model_name="refiner")
    model = httpx.get(f"{server.url}/v1/models/refiner").json()
    assert model["pipeline"] == "StableDiffusionXLImg2ImgPipeline" and model["inputs"] == ["image"]
    out = predict_one(server, {"prompt": "sharper", "image": IMAGE, "strength": 0.3, "num_inference_steps": 10})
    assert decode_png(out["image"]["b64"]).shape == (128, 128, 3)
    r = server.predict({"instances": ["no image"]})
    assert r.status_code == 400 and "instances[0].image: required: the loaded model is an image-to-image" in r.text
    r = server.predict({"instances": [{"prompt": "x", "image": IMAGE, "mask": MASK}]})
    assert r.status_code == 400 and "instances[0].mask: the loaded model (an SDXL refiner alone) does not inpaint" in r.text
    server.stop()


def test_an_inpainting_model_needs_image_and_mask(models, start_server):
    server = start_server("--model_dir", str(models["sd-inpaint"]), model_name="inpaint")
    assert httpx.get(f"{server.url}/v1/models/inpaint").json()["inputs"] == ["image", "mask"]
    out = predict_one(server, {"prompt": "a cat", "image": IMAGE, "mask": MASK, **FAST})
    assert out["parameters"]["mode"] == "inpaint"
    for instance, field in (({"prompt": "x"}, "image"), ({"prompt": "x", "image": IMAGE}, "mask")):
        r = server.predict({"instances": [instance]})
        assert r.status_code == 400 and f"instances[0].{field}: required" in r.text
    server.stop()


def test_a_rotated_phone_photo_is_read_upright(sdxl_server):
    import io

    from PIL import Image

    photo = make_image(128, 64)
    exif = photo.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to show
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", exif=exif)
    image = base64.b64encode(buffer.getvalue()).decode()
    mask = b64_image(Image.new("L", (64, 128), 255))  # drawn over the upright picture, as a browser shows it
    out = predict_one(sdxl_server, {"prompt": "x", "image": image, "mask": mask, **FAST})
    assert (out["parameters"]["width"], out["parameters"]["height"]) == (64, 128)
