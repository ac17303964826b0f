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

from .imaging import encode_image
from .stream_client import _openai_body, _server, generate_streamed

# generation field -> (flag, type); the allowed values are the schema's (--show_parameters)
FLAGS = {
    "negative_prompt": ("--negative_prompt", str),
    "width": ("--width", int),
    "height": ("--height", int),
    "num_inference_steps": ("--steps", int),
    "guidance_scale": ("--guidance", float),
    "seed": ("--seed", int),
    "num_images": ("--num_images", int),
    "scheduler": ("--scheduler", str),
    "refiner": ("--refiner", str),
    "high_noise_frac": ("--high_noise_frac", float),
    "refiner_strength": ("--refiner_strength", float),
    "strength": ("--strength", float),
    "eta": ("--eta", float),
    "timestep_spacing": ("--timestep_spacing", str),
    "timesteps": ("--timesteps", str),  # JSON text, e.g. "[999, 749, 499, 249]"
}
EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdserve generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="what to generate (not needed with --show_parameters)")
    parser.add_argument("-o", "--output", default="out.png", help="file to write (.png, .jpg or .webp)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running sdserve, e.g. http://localhost:8080 (the default)")
    where.add_argument("--model_dir", help="generate here, without a server, from this model folder")
    parser.add_argument("--api", choices=["v1", "openai"], default="v1", help="server route to call")
    parser.add_argument("--model_name", default="sdxl", help="model name on the server")
    parser.add_argument("--token", help="bearer token (e.g. `oc whoami -t` behind OpenShift AI's auth)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar on stderr: the queue position, then the steps (default: when "
                        "stderr is a terminal); against a server it streams from the OpenAI route, whatever --api")
    parser.add_argument("--show_parameters", action="store_true",
                        help="print each request field's type, default and allowed values, as the server "
                        "(--url) or this machine (--model_dir) takes them, and exit")
    for field, (flag, kind) in FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, help=f"{field} (allowed: see --show_parameters)")
    parser.add_argument("--image", metavar="FILE", help="start image (PNG, JPEG or WebP): img2img, or inpainting "
                        "with --mask; the output takes its size unless --width/--height are given")
    parser.add_argument("--mask", metavar="FILE", help="inpainting mask, the image's size: white = repaint, "
                        "black = keep (needs --image)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                        help="a LoRA adapter of the model, with an optional scale (repeatable)")
    local = parser.add_argument_group("local generation (--model_dir)")
    local.add_argument("--refiner_dir")
    local.add_argument("--device", default="auto")
    local.add_argument("--dtype", default="auto")
    local.add_argument("--lora_dir", help="LoRA adapters folder (default: <model_dir>/loras)")
    return parser


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
    url, headers = _server(args)
    if args.api == "openai":
        body = _openai_body(args, params)
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


def load_local(args: argparse.Namespace):
    """The server's own model, parser and engine, loaded here with the server's default limits."""
    from .generation import EngineSettings
    from .models.layout import ModelStoreError
    from .predictor import ModelSettings, SDModel
    from .request import Limits

    limits = Limits()
    settings = ModelSettings(model_dir=args.model_dir, refiner_dir=args.refiner_dir, lora_dir=args.lora_dir,
                             device=args.device, dtype=args.dtype)
    model = SDModel(Path(args.model_dir).name, settings, limits, EngineSettings(max_batch_images=limits.max_images))
    try:
        model.load()
    except ModelStoreError as exc:
        raise SystemExit(f"error: {exc}") from None
    return model


def generate_local(args: argparse.Namespace, params: dict[str, Any]) -> list[tuple[bytes, int]]:
    """The server's own model and engine, without the server."""
    import asyncio

    from kserve.errors import InvalidInput
    from tqdm.auto import tqdm

    from .generation import Progress

    model = load_local(args)
    try:
        request = model.parser.parse({"prompt": args.prompt, **params})
    except InvalidInput as exc:
        raise SystemExit(f"error: {exc.reason}") from None
    with tqdm(unit="step", desc="denoising", file=sys.stderr, disable=args.progress is False) as bar:
        def progress(p: Progress) -> None:  # the engine's progress hook: one call per image and step
            bar.total = p.steps * request.num_images
            bar.update(1)

        (result,) = asyncio.run(model.batch_engine.generate([request], "cli", on_progress=progress))
    model.stop()
    return [
        (encode_image(img, request.image_format, request.quality, request.image_parameters(seed, model.name)), seed)
        for img, seed in zip(result.images, result.seeds)
    ]


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
        # imported here, not at the top: parameter_help reads this module's FLAGS and load_local
        from .parameter_help import describe_parameters, request_schema

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
