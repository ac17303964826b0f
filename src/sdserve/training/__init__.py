"""``sdserve train``: DreamBooth LoRA fine-tuning of SD 1.x/2.x and SDXL, written where sdserve
servers read adapters.

    options.py      flags and every check that can fail before training (exit status 2)
    dataset.py      instance images, their captions, cropping to the training size
    prior.py        class images for prior preservation, made once and kept
    sampling.py     images from sdserve's own engine (class and validation images)
    model.py        the base model (the server's model store) and its text conditioning
    data.py         latents and text embeddings, cached and shared by the main process
    lora.py         peft LoRA layers; checkpoint state; diffusers' LoRA file format
    objective.py    one micro-batch and its loss
    checkpoints.py  checkpoint folders, --resume
    loop.py         the accelerate training loop of one process
    output.py       the adapter folder (local or S3) and its sdserve.json recipe
    distributed.py  the same loop on Ray Train workers (--ray_workers)
"""

from __future__ import annotations

import os
import sys

from .options import (
    InputError,
    TrainOptions,
    check_flags,
    check_name,
    check_output,
    check_resolution,
    inspect_model,
    parse_args,
)
from .output import PublishError, location

__all__ = ["InputError", "TrainOptions", "check_inputs", "main"]


def check_inputs(opts: TrainOptions) -> None:
    """All that can be checked before the model is loaded; raises InputError. A remote model is
    checked where it is downloaded (by the training processes)."""
    from ..models.storage import is_remote
    from . import dataset

    check_name(opts.name)
    check_output(opts.output)
    check_flags(opts)
    if not is_remote(opts.model_dir):
        check_resolution(opts.resolution, inspect_model(opts.model_dir).native_size)
    if not is_remote(opts.images):
        dataset.check_readable(dataset.find_examples(opts.images, opts.instance_prompt))


def main(argv: list[str]) -> None:
    opts, parser = parse_args(argv)
    try:
        check_inputs(opts)
        if opts.ray_workers:
            from .distributed import train_with_ray

            train_with_ray(opts)
        else:
            from .loop import train

            train(opts)
    except InputError as exc:
        parser.error(str(exc))  # usage, the message, exit status 2
    except PublishError as exc:
        raise SystemExit(f"sdserve train: error: {exc}") from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets here
        print(f"wrote adapter {opts.name} to {location(opts.output, opts.name)}")
        sys.stdout.flush()
