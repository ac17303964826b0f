"""The README's code blocks, run as written against real servers. A block that starts with
``# on a FLUX.1 server named flux`` (or another family's) is for that kind of server; the others
are for the SDXL demo server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers.images import make_image, make_mask
from helpers.paths import REPO

README = REPO / "README.md"
_SERVER = re.compile(r"\A# on an? (.+?) server named (\w+)")


def readme_blocks(language: str, must_contain: str, server: str | None = None) -> list[str]:
    """Blocks of ``language`` holding ``must_contain``, for the ``server`` kind ("FLUX.1", "SD3.5",
    ...; None: the SDXL demo server's, the blocks that name no server)."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    out = []
    for block in blocks:
        marker = _SERVER.match(block)
        if must_contain in block and (marker.group(1) if marker else None) == server:
            out.append(block)
    return out


def example_inputs(folder: Path) -> None:
    """The files the README's image-input examples read."""
    make_image(128, 128).save(folder / "in.png")
    make_image(128, 128, seed=1).save(folder / "photo.png")
    make_mask(128, 128).save(folder / "mask.png")


def run_block(language: str, block: str, server, folder: Path) -> subprocess.CompletedProcess:
    """``block`` run in ``folder`` with the server's address in place of the README's."""
    text = block.replace("localhost:8080", server.url.removeprefix("http://"))
    if getattr(server, "grpc_target", None):
        text = text.replace("localhost:8081", server.grpc_target)
    if language == "python":
        (folder / "example.py").write_text(text)
        command = [sys.executable, str(folder / "example.py")]
    else:
        command = ["bash", "-euo", "pipefail", "-c", text]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=180)
