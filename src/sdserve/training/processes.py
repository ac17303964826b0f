"""The training processes together: the accelerator (which reads the ranks from the environment
that torchrun, accelerate launch, the training operator or Ray Train set), and work done by some
processes whose outcome all of them learn, so that none waits forever for one that failed."""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from . import output
from .options import InputError, TrainOptions


def make_accelerator(opts: TrainOptions):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = opts.mixed_precision
    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None  # accelerate launch --mixed_precision ...: its own setting
        elif torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "no"
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),  # accelerate only sees CPU processes as distributed when told
        # the main process may make class images for a long while as the others wait
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )


# Errors with a message for the user, raised again as themselves in every process.
SHARED_ERRORS = {cls.__name__: cls for cls in (InputError, output.PublishError)}


def together(accelerator, mine: bool, work):
    """``work()`` on the processes where ``mine``; all of them then learn whether it failed, so a
    failure stops every process (with its message) instead of leaving the others waiting."""
    from accelerate.utils import gather_object

    result, error, failure = None, None, None
    if mine:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - raised again below, once the others know
            error, failure = (type(exc).__name__, str(exc)), exc
    errors = [e for e in gather_object([error]) if e] if accelerator.num_processes > 1 else [e for e in [error] if e]
    if failure is not None:
        raise failure
    if errors:
        kind, message = errors[0]
        if kind in SHARED_ERRORS:
            raise SHARED_ERRORS[kind](message)
        raise RuntimeError(f"another training process failed: {kind}: {message}")
    return result


def in_turn(accelerator, work):
    """``work()`` on rank 0 first, then on each other node's first process, then on the rest: a
    download cache on a volume all nodes share is filled once, one on a node's own disk once per
    node."""
    result = None
    for mine in (accelerator.is_main_process,
                 accelerator.is_local_main_process and not accelerator.is_main_process,
                 not accelerator.is_local_main_process):
        done = together(accelerator, mine, work)
        result = done if mine else result
    return result
