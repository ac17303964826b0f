"""LoRA adapters in S3 (``--lora_dir s3://...``): two real server processes on one local S3
endpoint (moto's server on loopback) serve an adapter uploaded after both started, with no
restart; the store is listed again at most once per ``--lora_relist_seconds``; a corrupt or
pickled adapter gets a clear answer and the servers keep serving."""

from __future__ import annotations

import base64
import json
import re
import time

import httpx
import pytest

from helpers.s3 import S3_CREDENTIALS as CREDENTIALS
from helpers.s3 import local_s3
from helpers.servers import free_port
from sdserve import metrics
from sdserve.adapters import AdapterFetchError, Adapters, open_store

BUCKET = "adapters"
STORE = f"s3://{BUCKET}/loras/"
RECIPE = {"description": "uploaded after start-up", "scale": 0.8, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def s3(models):
    """A local S3 endpoint whose store holds one adapter at start: ``first`` (the tiny ``trex``)."""
    with local_s3(BUCKET) as (endpoint, client):
        upload(client, models, "trex", "first")
        yield endpoint, client


def upload(client, models, source: str, name: str, recipe: dict | None = None) -> None:
    """Put a tiny adapter under ``loras/<name>/`` as training writes it: recipe first, weights last."""
    if recipe is not None:
        client.put_object(Bucket=BUCKET, Key=f"loras/{name}/sdserve.json", Body=json.dumps(recipe).encode())
    weights = models["sdxl-loras"] / "loras" / source / "pytorch_lora_weights.safetensors"
    client.upload_file(str(weights), BUCKET, f"loras/{name}/pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def replicas(s3, models, start_server, tmp_path_factory):
    """Two replicas of one InferenceService: same model, same adapter store, own download caches."""
    endpoint, _ = s3
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    return [
        start_server("--model_dir", str(models["sdxl"]), "--lora_dir", STORE, "--lora_relist_seconds", "1",
                     "--download_dir", str(tmp_path_factory.mktemp(f"cache-{i}")), model_name="remote", env=env)
        for i in range(2)
    ]


def generate(server, loras=None, seed: int = 7):
    payload = {"prompt": "a dinosaur", "num_inference_steps": 3, "seed": seed, **({"loras": loras} if loras else {})}
    return server.predict({"instances": [payload]})


def image_of(response) -> bytes:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["predictions"][0]["image"]["b64"])


def metadata(server) -> dict:
    return httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=10).json()


def test_adapter_uploaded_after_start_is_served_by_every_replica(s3, models, replicas):
    _, client = s3
    for server in replicas:
        assert metadata(server)["adapters"] == ["first"]
        assert generate(server, ["late"]).status_code == 400  # not uploaded yet
    base = image_of(generate(replicas[0]))
    upload(client, models, "pixel", "late", RECIPE)
    time.sleep(1.1)  # past --lora_relist_seconds since the 400 above listed the store
    images = [image_of(generate(server, ["late"])) for server in replicas]
    assert images[0] == images[1], "same seed, same adapter: the replicas must agree"
    assert images[0] != base, "the adapter must change the image"
    for server in replicas:
        info = metadata(server)
        assert info["adapters"] == ["first", "late"]
        assert info["recipes"]["late"]["description"] == RECIPE["description"]
        prediction = generate(server, ["late"]).json()["predictions"][0]
        assert prediction["parameters"]["loras"] == [{"name": "late", "scale": RECIPE["scale"]}]
        assert prediction["parameters"]["num_inference_steps"] == RECIPE["num_inference_steps"]
        assert re.search(r"downloaded LoRA adapter late \(\d+ bytes\)", server.log())
    # an adapter listed at start-up is downloaded on its first use, too
    assert image_of(generate(replicas[0], ["first"])) == image_of(generate(replicas[1], ["first"]))


def test_corrupt_or_pickled_adapters_get_clear_answers_and_serving_goes_on(s3, models, replicas):
    _, client = s3
    server = replicas[1]
    client.put_object(Bucket=BUCKET, Key="loras/broken/pytorch_lora_weights.safetensors", Body=b"not safetensors")
    client.put_object(Bucket=BUCKET, Key="loras/pickled/adapter.bin", Body=b"\x80\x04pickle")
    time.sleep(1.1)
    r = generate(server, ["broken"])
    assert r.status_code == 502, r.text
    assert "broken" in r.json()["error"] and "safetensors" in r.json()["error"]
    r = generate(server, ["pickled"])
    assert r.status_code == 400 and "no adapter named 'pickled'" in r.json()["error"]
    assert "pickle weights are refused (adapter.bin)" in server.log()
    assert image_of(generate(server)) == image_of(generate(replicas[0]))  # still serving, same images
    # fixed in the store: the next request downloads the good file (a failed download is not cached)
    upload(client, models, "trex", "broken")
    time.sleep(1.1)  # the failed fetch made the next request list the store again, past the interval
    assert generate(server, ["broken"]).status_code == 200


def listings() -> float:
    return metrics.LORA_LISTINGS.labels(result="ok")._value.get()


@pytest.mark.slow
def test_relisting_is_rate_limited(s3, models, tmp_path, monkeypatch):
    endpoint, client = s3
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    adapters = Adapters(open_store(STORE, tmp_path), rescan_seconds=4)
    assert "first" in adapters.names()
    before = listings()
    assert not any(adapters.exists("ghost") for _ in range(20))
    assert listings() - before <= 1, "20 misses within the interval list the store at most once"
    upload(client, models, "trex", "fresh")
    assert not adapters.exists("fresh"), "listed less than --lora_relist_seconds ago: not listed again"
    time.sleep(4.1)
    assert adapters.exists("fresh")
    # fetched once, from the cache after that; nothing is downloaded at listing but recipes
    downloads = metrics.LORA_DOWNLOADS.labels(result="ok")._value.get()
    adapters.fetch(["fresh"])
    adapters.fetch(["fresh"])
    assert metrics.LORA_DOWNLOADS.labels(result="ok")._value.get() == downloads + 1
    assert not (tmp_path / "loras").exists() or not list((tmp_path / "loras").rglob("*.partial"))


def test_unreachable_store_fails_start_up_and_a_failed_relisting_keeps_the_adapters(s3, tmp_path, monkeypatch):
    endpoint, _ = s3
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Exception, match="cannot list LoRA adapters in s3://no-such-bucket/"):
        Adapters(open_store("s3://no-such-bucket/loras", tmp_path))
    adapters = Adapters(open_store(STORE, tmp_path), rescan_seconds=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # the store goes away
    adapters.store._client = None
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "1")
    assert adapters.exists("first") and not adapters.exists("ghost")
    assert adapters.list_error and "first" in adapters.names()
    with pytest.raises(AdapterFetchError, match="first could not be fetched from s3://adapters/loras/"):
        adapters.fetch(["first"])


def test_other_schemes_are_listed_as_downloaded_snapshots(models, tmp_path):
    """A location with no cheap listing (here file://, read by KServe's storage code like gs:// or
    hf://) is downloaded whole at each listing; the two newest snapshots are kept."""
    import shutil

    source = tmp_path / "store"
    shutil.copytree(models["sdxl-loras"] / "loras" / "trex", source / "trex")
    adapters = Adapters(open_store(f"file://{source}", tmp_path / "cache"), rescan_seconds=0)
    assert adapters.names() == ["trex"]
    shutil.copytree(models["sdxl-loras"] / "loras" / "pixel", source / "pixel")
    assert adapters.exists("pixel") and adapters.names() == ["pixel", "trex"]
    adapters.fetch(["pixel"])
    for _ in range(3):
        adapters.scan()
    assert len(list((tmp_path / "cache").rglob("snapshot-*"))) == 2
