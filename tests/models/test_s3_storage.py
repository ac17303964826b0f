"""Models in S3, as OpenShift AI stores them: a local S3 endpoint (moto's server on loopback),
KServe's own storage code to download, and a real server serving the result."""

import json
import stat

import pytest

from helpers.s3 import S3_CREDENTIALS as CREDENTIALS
from helpers.s3 import local_s3
from sdserve.models import storage
from sdserve.models.layout import ModelStoreError


@pytest.fixture(scope="module")
def s3_endpoint(models):
    """An S3 endpoint holding the tiny SDXL base + refiner under s3://models/sdxl/."""
    with local_s3("models") as (endpoint, client):
        root = models["sdxl-refiner"]
        for path in root.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "models", f"sdxl/{path.relative_to(root).as_posix()}")
        yield endpoint


def make_read_only(root):
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_storage_initializer_download_then_serve_read_only(s3_endpoint, tmp_path, monkeypatch, start_server):
    """What KServe does on OpenShift AI: the storage initializer copies the prefix to /mnt/models
    (read-only for the server), then the server starts on it."""
    from kserve_storage import Storage

    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    mnt_models = tmp_path / "mnt-models"
    Storage.download("s3://models/sdxl/", str(mnt_models))
    assert (mnt_models / "base" / "model_index.json").is_file() and (mnt_models / "refiner" / "unet").is_dir()
    make_read_only(mnt_models)
    server = start_server("--model_dir", str(mnt_models), model_name="from-s3")
    r = server.predict({"instances": [{"prompt": "a bucket", "num_inference_steps": 3}]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["parameters"]["refiner"] == "ensemble"


@pytest.mark.slow
def test_model_dir_can_be_an_s3_uri_with_data_connection_variables(s3_endpoint, tmp_path, start_server):
    """--model_dir s3://... downloads at start-up; OpenShift AI data connections name the endpoint
    AWS_S3_ENDPOINT."""
    cache = tmp_path / "cache"
    server = start_server(
        "--model_dir", "s3://models/sdxl/", "--download_dir", str(cache), model_name="direct-s3",
        env={**CREDENTIALS, "AWS_S3_ENDPOINT": s3_endpoint},
    )
    r = server.predict({"instances": [{"prompt": "a bucket", "num_inference_steps": 3}]})
    assert r.status_code == 200, r.text
    (downloaded,) = [p for p in cache.iterdir() if not p.name.endswith(".partial")]
    assert (downloaded / "base" / "model_index.json").is_file()


def test_storage_config_secret_json_and_download_reuse(s3_endpoint, tmp_path, monkeypatch):
    """The storage-config secret's JSON (STORAGE_CONFIG) works too; a second start reuses the copy."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("STORAGE_CONFIG", json.dumps({
        "type": "s3", "access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "endpoint_url": s3_endpoint, "region": "us-east-1",
    }))
    first = storage.local_path("s3://models/sdxl/refiner", tmp_path)
    assert storage.local_path("s3://models/sdxl/refiner", tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.rsplit("/", 1)[1]]
    with pytest.raises(ModelStoreError, match="cannot download s3://missing-bucket/x"):
        storage.local_path("s3://missing-bucket/x", tmp_path)
    assert storage.local_path("/mnt/models", tmp_path) == "/mnt/models"
