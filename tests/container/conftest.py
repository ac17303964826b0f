"""The images the container tests share, built once: the serving image from the Containerfile."""

from __future__ import annotations

import pytest

from helpers.podman import Podman, ensure_tools, torch_cpu_wheel

IMAGE = "localhost/sdserve:test"


@pytest.fixture(scope="package")
def podman() -> Podman:
    ensure_tools()
    return Podman()


@pytest.fixture(scope="package")
def image(podman) -> str:
    base = podman.base_image()
    wheel = torch_cpu_wheel()
    old = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    podman.build(IMAGE, build_args={"BASE_IMAGE": base, "RUNTIME_IMAGE": base, "TORCH_SPEC": f"/wheels/{wheel.name}"},
                 volumes=(f"{wheel.parent}:/wheels:ro",))
    if old and old != podman.inspect(IMAGE, "{{.Id}}"):
        podman("rmi", old, check=False)  # the image this tag named before (its cached layers stay)
    return IMAGE
