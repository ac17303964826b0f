"""The trained adapter, written where servers read adapters: ``<output>/<name>/`` holding
``pytorch_lora_weights.safetensors`` and its ``sdserve.json`` recipe, nothing else.

Servers offer an adapter once its weights exist, so the recipe goes first and the weights last;
locally each file is written under a name servers ignore and renamed into place, and an S3 object
only appears once its upload completes. Checkpoints and validation images stay in the work folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# WEIGHTS: the file name servers look for first in an adapter folder
from ..adapters.store import WEIGHTS
from ..request.recipes import RECIPE_FILE, parse_recipe


class PublishError(RuntimeError):
    """The trained adapter could not be written to --output (it is still in the work folder)."""


def recipe(instance_prompt: str, description: str, scale: float, steps: int, guidance_scale: float,
           size: int) -> dict:
    """The adapter's ``sdserve.json``: what it was trained on, its recommended scale and the
    settings to sample it with; checked as a server will check it."""
    data = {
        "instance_prompt": instance_prompt,
        "description": description,
        "scale": scale,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "width": size,
        "height": size,
    }
    parse_recipe(json.dumps(data))  # raises RecipeError on a key or value servers would refuse
    return data


def _replace_local(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.partial")  # no .safetensors suffix: servers ignore it
    shutil.copyfile(source, partial)
    os.chmod(partial, 0o664)  # group-writable: OpenShift runs pods as an arbitrary UID in group 0
    os.replace(partial, target)


def location(output: str, name: str) -> str:
    """Where the adapter goes: ``<output>/<name>/``."""
    if output.startswith("s3://"):
        return f"{output.rstrip('/')}/{name}/"
    return str(Path(output) / name)


def publish(weights: Path, recipe_data: dict, output: str, name: str) -> str:
    """Write the recipe, then the weights, to ``<output>/<name>/``; returns that location."""
    recipe_file = weights.with_name(RECIPE_FILE)
    recipe_file.write_text(json.dumps(recipe_data, indent=2) + "\n", encoding="utf-8")
    try:
        if output.startswith("s3://"):
            return _upload(weights, recipe_file, output, name)
        target = Path(output) / name
        target.mkdir(parents=True, exist_ok=True)
        _replace_local(recipe_file, target / RECIPE_FILE)
        _replace_local(weights, target / WEIGHTS)
        return str(target)
    except Exception as exc:  # storage backends raise anything: say what failed and what to do
        raise PublishError(
            f"cannot write the adapter to {location(output, name)}: {type(exc).__name__}: {exc}; it is in "
            f"{weights.parent}/: copy that folder, or fix the problem and rerun with --resume (the last "
            "checkpoint is published without training again)"
        ) from exc


def _upload(weights: Path, recipe_file: Path, output: str, name: str) -> str:
    from ..models.storage import s3_client, split_s3_uri

    bucket, prefix = split_s3_uri(output)
    folder = f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name
    client = s3_client()
    client.upload_file(str(recipe_file), bucket, f"{folder}/{RECIPE_FILE}")
    client.upload_file(str(weights), bucket, f"{folder}/{WEIGHTS}")  # last: servers offer it from now on
    return f"s3://{bucket}/{folder}/"
