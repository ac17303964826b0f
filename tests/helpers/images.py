"""Pictures for image inputs (seeded, smooth, so VAE encodings are not noise) and decoding answers."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def make_image(width: int = 128, height: int = 128, seed: int = 0) -> Image.Image:
    """A smooth, seeded RGB picture (gradients and a disc), so VAE encodings are not noise."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.5, 3.0, 3)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08).astype(float)
    rgb = np.stack([np.sin(a * x * 6) * 0.5 + 0.5, np.cos(b * y * 6) * 0.5 + 0.5, 0.6 * disc + 0.4 * c / 3], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def make_mask(width: int = 128, height: int = 128) -> Image.Image:
    """White (repaint) over the right half, black (keep) elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask, "L")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64_image(image: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encode(image, fmt)).decode()
