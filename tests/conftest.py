"""Shared fixtures: tiny models built with the real classes, and real sdserve servers started the
way users start them (``python -m sdserve ...``) on free ports. Helpers live in ``helpers/``."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.browser import browser_page
from helpers.servers import Server
from sdserve.tiny import write_tiny_model


def pytest_addoption(parser):
    parser.addoption("--container", action="store_true",
                     help="run the container tests (tests/container: root and podman; make container-test)")


def pytest_collection_modifyitems(config, items):
    """The container tests run only when asked for (they build images: minutes, and root)."""
    if config.getoption("--container"):
        return
    kept = [item for item in items if "container" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "container" in item.keywords])
        items[:] = kept


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of each kind, saved and loaded through the real code."""
    root = tmp_path_factory.mktemp("models")
    built = {kind: write_tiny_model(root / kind, kind) for kind in ("sdxl-refiner", "sdxl", "sd", "sd3", "sd-single-file")}
    # the same SDXL base weights as "sdxl" (same seed), with two LoRA adapters under loras/
    built["sdxl-loras"] = write_tiny_model(root / "sdxl-loras", "sdxl", loras=("trex", "pixel"))
    for kind in ("sd-inpaint", "sdxl-inpaint", "refiner-only", "sd35", "flux", "flux-schnell", "flux-fill"):
        built[kind] = write_tiny_model(root / kind, kind)
    return built


class Servers:
    """Servers started by a scope's tests, stopped together when it ends (all told to stop first,
    then waited for: a server takes a second or two to shut down)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[Server] = []

    def start(self, *args: str, wait: bool = True, **kw) -> Server:
        server = Server(*args, log_dir=self.log_dir, **kw)
        self.started.append(server)
        return server.wait_ready() if wait else server

    def stop_all(self) -> None:
        for server in self.started:
            server.terminate()
        for server in self.started:
            server.stop()


@pytest.fixture(scope="session")
def session_servers(tmp_path_factory):
    servers = Servers(tmp_path_factory.mktemp("logs"))
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start a server with the given flags; the module's servers stop when it ends."""
    servers = Servers(tmp_path_factory.mktemp("logs"))
    yield servers.start
    servers.stop_all()


@pytest.fixture(scope="session")
def sdxl_server(models, session_servers) -> Server:
    """Tiny SDXL base + refiner (base/ + refiner/ layout), batching compatible requests; shared by
    every module."""
    return session_servers.start("--model_dir", str(models["sdxl-refiner"]), "--max_batch_wait_ms", "100")


@pytest.fixture(scope="module")
def page():
    """A page of a headless Chromium, for the module's playground tests (skipped without Chromium)."""
    yield from browser_page()
