"""The client side of sdserve's OpenAI image stream (``stream: true, stream_progress: true``):
server-sent events parsed into (event, data), a tqdm bar fed by the progress events, and the
completed images. Also the server address and OpenAI request body that ``sdserve generate``'s plain
requests share with it.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any


def server_address(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    url = (args.url or "http://localhost:8080").rstrip("/")
    return url, {"Authorization": f"Bearer {args.token}"} if args.token else {}


def openai_body(args: argparse.Namespace, params: dict[str, Any]) -> dict[str, Any]:
    """The request for the OpenAI generations route: sdserve's fields, with n and output_format."""
    params = dict(params)
    body = {"model": args.model_name, "prompt": args.prompt, "output_format": params.pop("format"), **params}
    if "num_images" in body:
        body["n"] = body.pop("num_images")
    return body


def sse_events(lines):
    """(event, data) of server-sent event lines; comments (keep-alives) skipped."""
    event, data = None, []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, json.loads("\n".join(data))


class StreamProgress:
    """The tqdm bar of a streamed request: the queue position while it waits, then the steps of
    all its images (each image's steps summed)."""

    def __init__(self, images: int):
        from tqdm.auto import tqdm

        self.images = images
        self.steps: dict[int, tuple[int, int]] = {}  # image index -> (step, steps)
        self.bar = tqdm(unit="step", desc="waiting", file=sys.stderr, dynamic_ncols=True)

    def update(self, data: dict[str, Any]) -> None:
        if data.get("queue_position") is not None:
            self.bar.set_description(f"queued (position {data['queue_position']})")
            return
        if data.get("steps") is None or data.get("image_index") is None:
            return
        self.steps[data["image_index"]] = (int(data["step"]), int(data["steps"]))
        each = max(steps for _, steps in self.steps.values())
        total = sum(steps for _, steps in self.steps.values()) + each * max(0, self.images - len(self.steps))
        if self.bar.total != total:
            self.bar.total = total
        self.bar.set_description("denoising", refresh=False)
        self.bar.n = sum(step for step, _ in self.steps.values())
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _error_message(response) -> str:
    try:
        answer = response.json()
    except ValueError:
        return response.text
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return answer["error"].get("message", answer["error"])
    return answer.get("error", answer) if isinstance(answer, dict) else answer


def generate_streamed(args: argparse.Namespace, params: dict[str, Any]) -> list[tuple[bytes, int]]:
    """The OpenAI generations route with ``stream: true, stream_progress: true``: a progress bar
    from its events, and the completed images (byte for byte those of a plain request)."""
    import httpx

    url, headers = server_address(args)
    body = {**openai_body(args, params), "stream": True, "stream_progress": True}
    images: dict[int, tuple[bytes, int]] = {}
    bar = StreamProgress(int(body.get("n", 1)))
    try:
        with httpx.stream("POST", f"{url}/openai/v1/images/generations", json=body, headers=headers,
                          timeout=args.timeout) as response:
            if response.status_code != 200:
                response.read()
                raise SystemExit(f"error {response.status_code}: {_error_message(response)}")
            for event, data in sse_events(response.iter_lines()):
                if event == "sdserve.progress":
                    bar.update(data)
                elif event == "image_generation.completed":
                    images[data["image_index"]] = (base64.b64decode(data["b64_json"]), data["seed"])
                elif event == "error":
                    error = data.get("error", {})
                    raise SystemExit(f"error: {error.get('message', error)}")
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: {url}: {exc}") from None
    finally:
        bar.close()
    if not images:
        raise SystemExit("error: the server's stream ended without an image")
    return [images[i] for i in sorted(images)]

