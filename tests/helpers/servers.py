"""Real ``python -m sdserve`` processes on free ports, started the way users start them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVER_START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: it drains, then exits) without waiting."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        self.terminate()
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
