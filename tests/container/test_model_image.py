"""A model as an OCI image (Containerfile.model, KServe's modelcar): built from a tiny model folder,
it holds /models with base/, refiner/ and loras/ in a layer each, owned by root and readable by any
UID, runs as no root and starts the way KServe starts it; the serving image serves it mounted
read-only at /mnt/models. A new adapter changes only the adapters' layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from helpers.images import decode_png
from helpers.podman import MODEL_NAME, serving
from sdserve.tiny import build_sdxl, write_lora, write_tiny_model

pytestmark = pytest.mark.container

MODEL_IMAGE = "localhost/sdserve-model:test"


def build_model_image(podman, folder: Path, tag: str) -> list[str]:
    """Build Containerfile.model from ``folder``; the image's layers, base image's included."""
    podman.build(tag, containerfile="Containerfile.model", build_args={"BASE_IMAGE": podman.base_image()},
                 contexts={"model": folder})
    return json.loads(podman.inspect(tag, "{{json .RootFS.Layers}}"))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("modelcar") / "model", "sdxl-refiner", loras=("trex",))


@pytest.fixture(scope="module")
def model_image(podman, model_folder) -> tuple[str, list[str]]:
    return MODEL_IMAGE, build_model_image(podman, model_folder, MODEL_IMAGE)


def test_the_model_is_under_models_owned_by_root_readable_by_anyone(podman, model_image):
    tag, _ = model_image
    assert podman.inspect(tag, "{{.Config.User}}") == "1001"
    listing = podman("run", "--rm", tag, "sh", "-c", "cd /models && ls -d */ loras/*/ base/model_index.json").stdout
    assert set(listing.split()) == {"base/", "refiner/", "loras/", "loras/trex/", "base/model_index.json"}
    not_root = podman("run", "--rm", tag, "sh", "-c", "find /models ! -user 0 | head -n 5").stdout.strip()
    unreadable = podman("run", "--rm", "--user", "1000870000:0", tag, "sh", "-c",
                        "find /models ! -readable | head -n 5").stdout.strip()
    assert not_root == "" and unreadable == ""


def test_kserve_can_start_it_as_a_modelcar(podman, model_image):
    tag, _ = model_image
    # what KServe's injected modelcar container runs (with /mnt/models in a shared volume)
    linked = podman("run", "--rm", tag, "sh", "-c",
                    "ln -sf /proc/$$/root/models /tmp/models && ls /tmp/models/base/model_index.json && "
                    "(sleep infinity & sleep 1; kill $!)")
    assert linked.stdout.strip().endswith("/tmp/models/base/model_index.json")


def test_a_new_adapter_changes_only_the_adapters_layer(podman, model_image, model_folder, tmp_path):
    tag, layers = model_image
    grown = tmp_path / "model"
    shutil.copytree(model_folder, grown, copy_function=shutil.copy2)  # same files, same times
    base, _ = build_sdxl(tmp_path / "scratch")
    write_lora(base, grown / "loras" / "pixel", seed=9)
    grown_layers = build_model_image(podman, grown, f"{MODEL_IMAGE}-grown")
    try:
        assert len(grown_layers) == len(layers)
        assert grown_layers[:-1] == layers[:-1], "the base model's and the refiner's layers are the same blobs"
        assert grown_layers[-1] != layers[-1]
    finally:
        podman("rmi", "-f", f"{MODEL_IMAGE}-grown", check=False)


def test_the_server_serves_the_model_image_mounted_read_only(podman, image, model_image):
    tag, _ = model_image
    root = Path(podman("image", "mount", tag).stdout.strip())  # the image's files, as the modelcar shares them
    try:
        with serving(podman, image, root / "models", user="1000870000:0") as (_, url):
            body = {"instances": [{"prompt": "a fox", "num_inference_steps": 4, "width": 64, "height": 64,
                                   "seed": 3, "loras": ["trex"]}]}
            answer = httpx.post(f"{url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=300)
            assert answer.status_code == 200, answer.text
            assert decode_png(answer.json()["predictions"][0]["image"]["b64"]).shape == (64, 64, 3)
            adapters = httpx.get(f"{url}/v1/models/{MODEL_NAME}", timeout=30).json()
            assert "trex" in json.dumps(adapters)
    finally:
        podman("image", "unmount", tag, check=False)
