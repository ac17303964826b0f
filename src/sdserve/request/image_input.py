"""Images that come in with a request (img2img start images and inpainting masks).

Clients send them as base64 text, ``data:`` URLs or raw bytes (multipart forms, v2 binary data,
gRPC). Only PNG, JPEG and WebP are read, and the size in the file header is checked before any
pixel is decoded, so a small file announcing a huge image costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from kserve.errors import InvalidInput
from PIL import Image, ImageOps

FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)


def decode_image(value: object, field: str, max_pixels: int) -> Image.Image:
    """A PIL image from base64 text, a data URL or bytes (not yet converted to a mode)."""
    if isinstance(value, Image.Image):
        return value
    data = _bytes(value, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(f"{field}: the image is larger than the server allows ({max_pixels} pixels)") from None
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is the client's error
        raise InvalidInput(f"{field}: not a readable PNG, JPEG or WebP image ({len(data)} bytes)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInput(
            f"{field}: {width}x{height} = {width * height} pixels is over the server limit of {max_pixels} pixels"
        )
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise InvalidInput(f"{field}: the {image.format} image does not decode: {exc}") from None
    # Upright as browsers and viewers show it: phone photos store their rotation in EXIF.
    return ImageOps.exif_transpose(image)


def _bytes(value: object, field: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: must be a base64-encoded PNG, JPEG or WebP image or a data: URL, "
                           f"got {type(value).__name__}")
    text = value.strip()
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end():]
    elif text[:5].lower() == "data:":
        raise InvalidInput(f"{field}: only base64 data: URLs are accepted (data:image/png;base64,...)")
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field}: not valid base64 (nor a data: URL)") from None


def has_transparency(image: Image.Image) -> bool:
    """Whether any pixel is fully transparent (OpenAI's mask convention marks those for repainting)."""
    alpha = _alpha(image)
    return alpha is not None and alpha.getextrema()[0] == 0


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """OpenAI's convention as sdserve's: fully transparent pixels (alpha 0) become white (repaint),
    every other pixel black (keep). None when the image has no alpha channel."""
    alpha = _alpha(image)
    if alpha is None:
        return None
    return alpha.point(lambda a: 255 if a == 0 else 0, mode="L")


def _alpha(image: Image.Image) -> Image.Image | None:
    if image.mode in ("RGBA", "LA", "PA"):
        return image.getchannel("A")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def as_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The start image as the model reads it: RGB at (width, height)."""
    rgb = image.convert("RGB")
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.LANCZOS)


def as_mask(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask as the pipelines read it: grayscale at (width, height), white = repaint."""
    gray = image.convert("L")
    return gray if gray.size == size else gray.resize(size, Image.Resampling.NEAREST)
