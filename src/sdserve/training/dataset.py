"""The instance images: found in a folder, each with its caption, checked readable, and cropped to
the training size.

A ``.txt`` file beside an image (same stem) is that image's caption instead of the instance prompt
(an empty one falls back to the instance prompt). Images are turned upright by their EXIF
orientation (phone photos), resized so the shorter side is the training size and centre-cropped to
a square; SDXL is also told the original size and the crop, as its own training did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .options import InputError

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


@dataclass(frozen=True)
class Pixels:
    """One cropped image as the VAE takes it, and the SDXL micro-conditioning that describes it."""

    tensor: torch.Tensor  # (3, size, size), -1..1
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def find_examples(folder: str | Path, instance_prompt: str) -> list[Example]:
    """The images under ``folder`` (not recursive), sorted by name, each with its caption."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--images {folder}: not a folder")
    images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not images:
        raise InputError(f"--images {folder}: no images in it (looked for {', '.join(SUFFIXES)})")
    examples = []
    for path in images:
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        examples.append(Example(path, caption or instance_prompt))
    return examples


def open_image(path: Path) -> Image.Image:
    """The image at ``path``, upright and RGB; InputError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"--images: cannot read {path}: {exc}") from None


def check_readable(examples: list[Example]) -> None:
    for example in examples:
        open_image(example.path)


def crop(image: Image.Image, size: int) -> Pixels:
    """Shorter side to ``size``, then the centre square."""
    width, height = image.size
    factor = size / min(width, height)
    resized = image.resize((max(size, round(width * factor)), max(size, round(height * factor))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    square = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    tensor = torch.from_numpy(square).permute(2, 0, 1) / 127.5 - 1.0
    return Pixels(tensor, (height, width), (top, left))


def fingerprint(examples: list[Example]) -> str:
    """Changes when any image's bytes or caption change (names the latent cache)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.path.name.encode() + b"\0" + example.caption.encode() + b"\0")
        digest.update(hashlib.sha256(example.path.read_bytes()).digest())
    return digest.hexdigest()[:16]
