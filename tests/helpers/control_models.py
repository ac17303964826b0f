"""Tiny control models under a tiny model's ``controls/``, each name always the same weights."""

from __future__ import annotations

from pathlib import Path

from sdserve.tiny import write_tiny_model

# name -> (kind without the family, seed)
CONTROLS = {"edges": ("controlnet", 1), "depth": ("controlnet", 2), "sketch": ("t2i-adapter", 3),
            "style": ("ip-adapter", 4)}


def write_controls(model: Path, family: str, names: tuple[str, ...] = tuple(CONTROLS)) -> Path:
    """``model/controls/<name>`` for each of ``names``, for a tiny ``family`` ("sd", "sdxl") model."""
    for name in names:
        kind, seed = CONTROLS[name]
        write_tiny_model(model / "controls" / name, f"{family}-{kind}", seed=seed)
    return model
