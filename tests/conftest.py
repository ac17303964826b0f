"""Shared fixtures: tiny models built with the real classes, and real sdserve servers started the
way users start them (``python -m sdserve ...``) on free ports."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sdserve.tiny import write_tiny_model

SERVER_START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def make_image(width: int = 128, height: int = 128, seed: int = 0) -> Image.Image:
    """A smooth, seeded RGB picture (gradients and a disc), so VAE encodings are not noise."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.5, 3.0, 3)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08).astype(float)
    rgb = np.stack([np.sin(a * x * 6) * 0.5 + 0.5, np.cos(b * y * 6) * 0.5 + 0.5, 0.6 * disc + 0.4 * c / 3], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def make_mask(width: int = 128, height: int = 128) -> Image.Image:
    """White (repaint) over the right half, black (keep) elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask, "L")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64_image(image: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encode(image, fmt)).decode()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def local_s3(*buckets: str):
    """A real S3 endpoint on loopback (moto's server): yields (endpoint URL, a boto3 client) with
    ``buckets`` created; servers reach it with S3_CREDENTIALS and AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    try:
        yield endpoint, client
    finally:
        server.stop()


class Server:
    """A real ``python -m sdserve`` process; stops on exit and shows its log when it fails."""

    def __init__(self, *args: str, log_dir: Path, model_name: str = "sdxl", env: dict | None = None):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.model_name = model_name
        self.log_path = log_dir / f"server-{self.http_port}.log"
        cmd = [
            sys.executable, "-m", "sdserve",
            "--http_port", str(self.http_port),
            "--grpc_port", str(self.grpc_port),
            "--model_name", model_name,
            *args,
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/v2/models/{self.model_name}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def predict(self, payload, timeout: float = 120, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models/{self.model_name}:predict", json=payload, timeout=timeout, **kw)

    def infer(self, payload, timeout: float = 120, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/v2/models/{self.model_name}/infer", json=payload, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of each kind, saved and loaded through the real code."""
    root = tmp_path_factory.mktemp("models")
    built = {kind: write_tiny_model(root / kind, kind) for kind in ("sdxl-refiner", "sdxl", "sd", "sd3", "sd-single-file")}
    # the same SDXL base weights as "sdxl" (same seed), with two LoRA adapters under loras/
    built["sdxl-loras"] = write_tiny_model(root / "sdxl-loras", "sdxl", loras=("trex", "pixel"))
    for kind in ("sd-inpaint", "sdxl-inpaint", "refiner-only"):
        built[kind] = write_tiny_model(root / kind, kind)
    return built


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start a server with the given flags; all are stopped at the end of the session."""
    servers: list[Server] = []
    log_dir = tmp_path_factory.mktemp("logs")

    def start(*args: str, wait: bool = True, **kw) -> Server:
        server = Server(*args, log_dir=log_dir, **kw)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def sdxl_server(models, start_server) -> Server:
    """Tiny SDXL base + refiner (base/ + refiner/ layout), batching compatible requests."""
    return start_server("--model_dir", str(models["sdxl-refiner"]), "--max_batch_wait_ms", "100")
