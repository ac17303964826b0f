"""``sdserve`` / ``python -m sdserve``: run the server, or a helper command.

    sdserve [server flags]                 serve the model under --model_dir
    sdserve generate "prompt" -o out.png   make images, via a server (--url) or locally (--model_dir)
    sdserve tiny-model DIR [--kind KIND]   write a tiny random-weight model for tests and demos
    sdserve train --model_dir DIR --images DIR --instance_prompt "a photo of sks dog" --name sks-dog --output DIR
                                           fine-tune a DreamBooth LoRA adapter that servers serve (the train extra)
"""

from __future__ import annotations

import argparse
import sys


def tiny_model_main(argv: list[str]) -> None:
    from ..tiny import KINDS, write_tiny_model

    parser = argparse.ArgumentParser(prog="sdserve tiny-model", description=write_tiny_model.__doc__)
    parser.add_argument("dest", help="folder to write the model to")
    parser.add_argument("--kind", choices=KINDS, default="sdxl-refiner",
                        help="sdxl-refiner: DIR/base + DIR/refiner; sdxl: one SDXL folder; sd: an SD 2.x-style "
                        "folder; sd3: an SD3 folder; sd-single-file: DIR/model.safetensors + DIR/config/")
    parser.add_argument("--loras", default="", help="comma-separated names of tiny LoRA adapters to add under DIR/loras/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    loras = tuple(name for name in args.loras.split(",") if name)
    path = write_tiny_model(args.dest, args.kind, args.seed, loras)
    print(f"wrote a tiny {args.kind} model to {path}")


def generate_main(argv: list[str]) -> None:
    from .generate import main as generate

    generate(argv)


# What the train extra brings (accelerate and peft are base dependencies, but say so if they are gone).
TRAIN_PACKAGES = ("ray", "tqdm", "accelerate", "peft")


def train_main(argv: list[str]) -> None:
    import importlib.util

    try:
        missing = [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]
        from ..training import main as train
    except ImportError:
        missing = ["sdserve.training"]
    if missing:
        print('sdserve train needs the training extra: pip install "sdserve[train]"', file=sys.stderr)
        raise SystemExit(2)
    train(argv)


COMMANDS = {"tiny-model": tiny_model_main, "generate": generate_main, "train": train_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    from ..server.app import serve
    from ..server.settings import load_config

    serve(load_config(argv))
