"""Reading OpenAI Images API answers and streams in the tests: the endpoints' URLs, files and RGBA
masks as the SDK uploads them, events grouped by image and checked against the types the SDK
declares, sdserve's counters and gauges from /metrics, and waiting for a condition."""

import base64
import io
import re
import time

import httpx
import numpy as np
from PIL import Image

from .images import encode

# The tests' quick requests; check_image_events expects image i's seed to be this seed + i.
FAST = {"seed": 7, "num_inference_steps": 6}


def url(server, path: str = "generations") -> str:
    return f"{server.url}/openai/v1/images/{path}"


def png_file(image: Image.Image, name: str = "in.png") -> tuple[str, bytes, str]:
    return (name, encode(image), "image/png")


def rgba_mask(white: Image.Image) -> Image.Image:
    """OpenAI's mask convention: transparent where ``white`` is white (repaint)."""
    alpha = np.where(np.asarray(white) == 255, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([np.zeros_like(alpha)] * 3 + [alpha]), "RGBA")


def extra(event, name: str):
    return event.model_extra[name]


def by_image(events) -> dict[int, list]:
    out: dict[int, list] = {}
    for event in events:
        out.setdefault(extra(event, "image_index"), []).append(event)
    return out


def counter(server, name: str, reason: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf'^{name}{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def gauge(server, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", httpx.get(f"{server.url}/metrics", timeout=10).text, re.M)
    return float(found.group(1))


def wait_for(check, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


def check_image_events(events, kind: str, n: int, partials: int, output_format: str = "png"):
    from openai.types import (
        ImageEditCompletedEvent,
        ImageEditPartialImageEvent,
        ImageGenCompletedEvent,
        ImageGenPartialImageEvent,
    )

    partial_cls, completed_cls = ((ImageGenPartialImageEvent, ImageGenCompletedEvent) if kind == "image_generation"
                                  else (ImageEditPartialImageEvent, ImageEditCompletedEvent))
    per_image = by_image(events)
    assert sorted(per_image) == list(range(n))
    for index, own in per_image.items():
        assert [e.type for e in own] == [f"{kind}.partial_image"] * partials + [f"{kind}.completed"]
        assert [e.partial_image_index for e in own[:-1]] == list(range(partials))
        assert all(isinstance(e, partial_cls) for e in own[:-1]) and isinstance(own[-1], completed_cls)
        for e in own:
            assert e.size == "128x128" and e.output_format == output_format and e.background == "auto"
            assert isinstance(e.created_at, int) and abs(e.created_at - time.time()) < 600
            assert extra(e, "seed") == FAST["seed"] + index
        for e in own[:-1]:
            preview = Image.open(io.BytesIO(base64.b64decode(e.b64_json)))
            assert preview.size == (128, 128) and preview.format == output_format.upper()
        usage = own[-1].usage
        assert usage.input_tokens == usage.input_tokens_details.text_tokens + usage.input_tokens_details.image_tokens
        assert usage.input_tokens_details.text_tokens > 0 and usage.output_tokens == index + 1
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    return {i: own[-1] for i, own in per_image.items()}
