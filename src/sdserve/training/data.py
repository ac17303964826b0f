"""The training set as tensors, computed once: each image's VAE latent distribution, its SDXL
micro-conditioning, and (while the text encoders are frozen) each distinct prompt's embeddings.

Only the main process reads images, makes class images and encodes; it keeps the result in
``<work_dir>/cache/`` (named by a digest of the model, images, captions and settings, so a rerun
reuses it) and sends it to the other processes, which wait for it: nodes need not share a disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..generation import ModelBackend
from ..models import storage
from ..models.layout import ModelStoreError
from . import dataset, prior
from .dataset import Example
from .model import TrainModel, time_ids
from .options import InputError, TrainOptions

log = logging.getLogger("sdserve")


@dataclass
class TrainingData:
    latent_mean: torch.Tensor  # (N, C, h, w): instance images first, then class images
    latent_std: torch.Tensor
    prompt_index: torch.Tensor  # (N,) row of each image's prompt in ``prompts``
    prompts: list[str]
    instances: int
    time_ids: torch.Tensor | None = None  # (N, 6), SDXL
    embeds: torch.Tensor | None = None  # (P, tokens, dim) when the text encoders are frozen
    pooled: torch.Tensor | None = None  # (P, dim), SDXL

    @property
    def classes(self) -> int:
        return len(self.latent_mean) - self.instances

    def to(self, device: torch.device) -> TrainingData:
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


def _encode(model: TrainModel, examples: list[Example], size: int, cache_text: bool) -> tuple[dict, list[str]]:
    phase = ModelBackend(model.loaded).base  # the engine's own VAE encoding, as img2img uses it
    prompts = list(dict.fromkeys(e.caption for e in examples))
    means, stds, ids = [], [], []
    with torch.no_grad():
        for example in examples:
            pixels = dataset.crop(dataset.open_image(example.path), size)
            dist = phase.encode_pixels(pixels.tensor[None], model.loaded.dtype)
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
            ids.append(time_ids(pixels.original_size, pixels.crop_top_left, size))
        tensors = {
            "latent_mean": torch.cat(means),
            "latent_std": torch.cat(stds),
            "prompt_index": torch.tensor([prompts.index(e.caption) for e in examples]),
        }
        if model.family == "sdxl":
            tensors["time_ids"] = torch.tensor(ids, dtype=torch.float32)
        if cache_text:
            embeds, pooled = model.encode(model.tokenize(prompts))
            tensors["embeds"] = embeds.float().cpu()
            if pooled is not None:
                tensors["pooled"] = pooled.float().cpu()
    return tensors, prompts


def _digest(model_dir: str, settings: dict, examples: list[Example]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    index = Path(model_dir) / "model_index.json"
    digest.update(str(Path(model_dir).resolve()).encode())
    if index.is_file():
        digest.update(index.read_bytes())
    digest.update(dataset.fingerprint(examples).encode())
    return digest.hexdigest()[:20]


def build(opts: TrainOptions, model: TrainModel, model_dir: str, size: int, work: Path,
          generate: Callable[[str, int, int, int, int], list]) -> bytes:
    """On the main process: class images (made or reused), then the tensors (computed or read
    from the cache), as safetensors bytes."""
    try:
        images = storage.local_path(opts.images)  # s3://... too: downloaded once
    except ModelStoreError as exc:
        raise InputError(f"--images: {exc}") from None
    examples = dataset.find_examples(images, opts.instance_prompt)
    instances = len(examples)
    if opts.prior_preservation:
        settings = {"prompt": opts.class_prompt, "size": size, "steps": opts.class_inference_steps,
                    "seed": opts.seed, "model": str(Path(model_dir).resolve())}
        paths, _ = prior.class_images(
            work / "class_images", settings, opts.num_class_images,
            lambda first, n: generate(opts.class_prompt, size, opts.class_inference_steps, opts.seed + first, n),
        )
        examples += [Example(path, opts.class_prompt) for path in paths]
    cache_text = not opts.train_text_encoder
    key = _digest(model_dir, {"size": size, "text": cache_text, "dtype": str(model.loaded.dtype),
                              "instances": instances}, examples)
    path = work / "cache" / f"data-{key}.safetensors"
    if path.is_file():
        log.info("reusing cached latents%s from %s", " and text embeddings" if cache_text else "", path)
        return path.read_bytes()
    tensors, prompts = _encode(model, examples, size, cache_text)
    payload = save_bytes(tensors, metadata={"prompts": json.dumps(prompts), "instances": str(instances)})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(payload)
    partial.replace(path)
    return payload


def share(payload: Callable[[], bytes], is_main: bool, processes: int) -> TrainingData:
    """Run ``payload`` on the main process and hand its result (or its error) to all processes."""
    if processes == 1:
        return parse(payload())
    from accelerate.utils import broadcast_object_list

    message: list = [None]
    if is_main:
        try:
            message = [("data", payload())]
        except InputError as exc:
            message = [("error", str(exc))]
        except Exception as exc:
            message = [("failed", f"{type(exc).__name__}: {exc}")]
            broadcast_object_list(message)
            raise
    broadcast_object_list(message)
    kind, value = message[0]
    if kind == "error":
        raise InputError(value)
    if kind == "failed":
        raise RuntimeError(f"the main process failed preparing the training data: {value}")
    return parse(value)


def parse(payload: bytes) -> TrainingData:
    """TrainingData from safetensors bytes (the metadata sits in the header's JSON)."""
    tensors = load_bytes(payload)
    header_size = struct.unpack("<Q", payload[:8])[0]
    metadata = json.loads(payload[8:8 + header_size]).get("__metadata__", {})
    return TrainingData(
        latent_mean=tensors["latent_mean"], latent_std=tensors["latent_std"],
        prompt_index=tensors["prompt_index"], prompts=json.loads(metadata["prompts"]),
        instances=int(metadata["instances"]), time_ids=tensors.get("time_ids"),
        embeds=tensors.get("embeds"), pooled=tensors.get("pooled"),
    )
