"""Encoding generated images (uint8 H x W x 3 arrays) into PNG, JPEG or WebP bytes."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# zlib level 3 encodes a 1024x1024 PNG about a third faster than Pillow's default 6 for ~6% more
# bytes; encoding runs off the GPU worker but still adds to each request's latency.
PNG_COMPRESS_LEVEL = 3
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 90) -> bytes:
    """Encode one image; ``quality`` applies to JPEG and WebP."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if image_format == "png":
        pil.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality)
    elif image_format == "webp":
        pil.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported image format {image_format!r}")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
