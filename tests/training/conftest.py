"""Fixtures of the training tests: one torch thread per module, and the tiny models and pictures
the runs train on, made once for the whole folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.training import write_images
from sdserve.tiny import write_tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and do not crawl when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-models")
    return {"sdxl": write_tiny_model(root / "sdxl", "sdxl"), "sd": write_tiny_model(root / "sd", "sd"),
            "images": write_images(root / "images")}
