"""``sdserve generate "prompt" -o out.png``: images from a terminal.

Against a running server (``--url``, KServe v1 or the OpenAI route) or one-shot on this machine
without a server (``--model_dir``). A progress bar on stderr (on a terminal, or with ``--progress``)
shows the queue position, then the steps: against a server it is fed by the OpenAI route's event
stream (``stream: true, stream_progress: true``), whichever ``--api`` is asked for. Files are PNG
(or JPEG/WebP by extension); PNGs carry the parameters that reproduce them, and several images get
their seed in the name.
``--image`` starts from a picture (img2img), ``--mask`` repaints only its white parts (inpainting).
``--show_parameters`` prints the request fields with their allowed values: the server's (its request
schema) or, with ``--model_dir``, the local parser's. The CLI keeps no copy of them: what a flag may
be is checked where the request is parsed.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

from .generate_options import EXTENSIONS, FLAGS, build_parser
from .local_model import generate_local
from .parameter_help import describe_parameters, request_schema
from .stream_client import generate_streamed, openai_body, server_address


def output_paths(output: str, seeds: list[int]) -> list[Path]:
    """``out.png`` for one image; ``out-<seed>.png`` for each of several."""
    path = Path(output)
    if len(seeds) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{seed}{path.suffix}") for seed in seeds]


def generate_remote(args: argparse.Namespace, params: dict[str, Any]) -> list[tuple[bytes, int]]:
    import httpx

    if args.progress:
        return generate_streamed(args, params)
    url, headers = server_address(args)
    if args.api == "openai":
        body = openai_body(args, params)
        response = httpx.post(f"{url}/openai/v1/images/generations", json=body, headers=headers, timeout=args.timeout)
        answer = response.json()
        if response.status_code != 200:
            raise SystemExit(f"error {response.status_code}: {answer['error']['message']}")
        return [(base64.b64decode(item["b64_json"]), item["seed"]) for item in answer["data"]]
    body = {"instances": [{"prompt": args.prompt, **params}]}
    response = httpx.post(f"{url}/v1/models/{args.model_name}:predict", json=body, headers=headers, timeout=args.timeout)
    answer = response.json()
    if response.status_code != 200:
        raise SystemExit(f"error {response.status_code}: {answer.get('error', answer)}")
    return [(base64.b64decode(i["b64"]), i["seed"]) for i in answer["predictions"][0]["images"]]


def _lora(spec: str) -> dict[str, Any]:
    name, _, scale = spec.partition(":")
    try:
        return {"name": name, "scale": float(scale)} if scale else {"name": name}
    except ValueError:
        raise SystemExit(f"error: --lora {spec}: the scale after ':' must be a number") from None


def _image_file(path: str, flag: str) -> str:
    """The file as base64, which both the server's JSON and the local parser take (and check)."""
    try:
        return base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as exc:
        raise SystemExit(f"error: {flag} {path}: {exc.strerror or exc}") from None


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show_parameters:
        print("\n".join(describe_parameters(request_schema(args))))
        sys.stdout.flush()
        return
    if args.prompt is None:
        parser.error("the following arguments are required: prompt")
    if args.mask and not args.image:
        raise SystemExit("error: --mask needs --image: the mask marks the parts of that image to repaint")
    params = {field: getattr(args, field) for field in FLAGS if getattr(args, field) is not None}
    for field in ("image", "mask"):
        if getattr(args, field):
            params[field] = _image_file(getattr(args, field), f"--{field}")
    if args.lora:
        params["loras"] = [_lora(spec) for spec in args.lora]
    params["format"] = EXTENSIONS.get(Path(args.output).suffix.lower(), "png")
    if args.progress is None and not args.model_dir:
        args.progress = sys.stderr.isatty()
    images = generate_local(args, params) if args.model_dir else generate_remote(args, params)
    for (data, seed), path in zip(images, output_paths(args.output, [s for _, s in images])):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path} (seed {seed})")
    sys.stdout.flush()
