"""The flags of ``sdserve generate``: each generation field's flag and type (what a flag may be is
checked where the request is parsed, by the server or the local parser)."""

from __future__ import annotations

import argparse

DESCRIPTION = 'sdserve generate "prompt" -o out.png: images from a terminal, from a running server or this machine'
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
    "prompt_syntax": ("--prompt_syntax", str),
}
EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdserve generate", description=DESCRIPTION)
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
