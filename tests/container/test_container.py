"""The container image, built with podman from the Containerfile (CPU torch, a Debian base made
with debootstrap: no registry is needed), really serves: as an arbitrary UID in group 0, with a
tiny model mounted read-only at /mnt/models, as KServe runs it. Needs root; ``make container-test``
runs it (the other targets leave it out)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from helpers.images import decode_png
from helpers.podman import MODEL_NAME, checksums, serving
from sdserve.tiny import write_tiny_model

pytestmark = pytest.mark.container

TEST_UID = 1000870000  # what OpenShift's restricted SCC hands out: any UID, group 0
WRITABLE = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = write_tiny_model(tmp_path_factory.mktemp("container") / "model", "sdxl-refiner")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o555 if path.is_dir() else path.stat().st_mode | 0o444)
    for parent in folder.parents:  # the container's UID must be able to reach the mount source
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o055)
    return folder


@pytest.fixture(scope="module")
def served(podman, image, model):
    """The image running as an arbitrary UID in group 0, /mnt/models read-only; (container, URL)."""
    before = checksums(model)
    with serving(podman, image, model, user=f"{TEST_UID}:0") as running:
        yield running
    assert checksums(model) == before, "the model folder changed while the container ran"


def test_image_configuration(podman, image):
    assert podman.inspect(image, "{{.Config.User}}") == "1001"
    assert '"/opt/sdserve/bin/python","-m","sdserve"' in podman.inspect(image, "{{json .Config.Entrypoint}}")
    ports = podman.inspect(image, "{{json .Config.ExposedPorts}}")
    assert "8080/tcp" in ports and "8081/tcp" in ports
    env = podman.inspect(image, "{{range .Config.Env}}{{println .}}{{end}}").splitlines()
    for setting in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "PYTHONUNBUFFERED=1"):
        assert setting in env
    assert {v for v in WRITABLE} <= {line.split("=", 1)[0] for line in env}
    version = podman("run", "--rm", "--entrypoint", "python", image, "-c", "import torch; print(torch.__version__)")
    assert version.stdout.strip().endswith("+cpu")  # the CPU wheel handed in


def test_no_compiler_and_no_model_in_the_image(podman, image):
    compilers = podman("run", "--rm", "--entrypoint", "sh", image, "-c", "command -v gcc cc c++ g++ clang || true")
    assert compilers.stdout.strip() == ""
    models = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                    "ls -A /mnt/models 2>/dev/null; ls -d /opt/models 2>/dev/null || true")
    assert models.stdout.strip() == ""


def test_serves_v1_and_v2_as_an_arbitrary_uid(served):
    _, url = served
    body = {"instances": [{"prompt": "a dog", "num_inference_steps": 4, "seed": 1, "width": 96, "height": 64}]}
    answer = httpx.post(f"{url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    image = answer.json()["predictions"][0]["image"]
    assert decode_png(image["b64"]).shape == (64, 96, 3) and image["seed"] == 1
    body = {"id": "42", "inputs": [{"name": "input0", "shape": [-1], "datatype": "BYTES", "data": ["Photo of a dog"]}],
            "parameters": {"num_inference_steps": 4, "seed": 7, "width": 64, "height": 96}}
    answer = httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["id"] == "42" and [o["name"] for o in out["outputs"]][:2] == ["image", "seed"]
    outputs = {o["name"]: o for o in out["outputs"]}
    assert outputs["image"]["datatype"] == "BYTES" and outputs["seed"]["datatype"] == "INT64"
    assert decode_png(outputs["image"]["data"][0]).shape == (96, 64, 3) and outputs["seed"]["data"][0] == 7


def test_runs_as_the_uid_given_writes_only_where_it_may(podman, served):
    name, _ = served
    status = podman("exec", name, "sh", "-c", "grep '^Uid:' /proc/1/status").stdout.split()
    assert status[1] == str(TEST_UID)
    assert podman("exec", name, "id", "-u").stdout.strip() == str(TEST_UID)
    assert podman("exec", name, "id", "-g").stdout.strip() == "0"
    probe = " ".join(f'"${var}"' for var in WRITABLE)
    not_writable = podman("exec", name, "sh", "-c",
                          f'for d in {probe}; do f="$d/.probe-$$"; (: >"$f" && rm -f "$f") 2>/dev/null || echo "$d"; done')
    assert not_writable.stdout.strip() == ""
    assert podman("exec", name, "sh", "-c", ": >/mnt/models/.probe", check=False).returncode != 0
    assert podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip() == "running"
