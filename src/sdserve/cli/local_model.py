"""``sdserve generate --model_dir``: the server's own model, parser and engine, loaded in this
process, without a server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..protocol.image_encoding import encode_image


def load_local(args: argparse.Namespace):
    """The server's own model, parser and engine, loaded here with the server's default limits."""
    from ..generation import EngineSettings
    from ..models.layout import ModelStoreError
    from ..request.types import Limits
    from ..server.model_setup import ModelSettings
    from ..server.predictor import SDModel

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

    from ..generation import Progress

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
