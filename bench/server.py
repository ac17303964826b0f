"""A real ``python -m sdserve`` process for the benchmark, and concurrent clients against it."""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from baseline import PROMPT


class Server:
    def __init__(self, model_dir: Path, args, cache_dir: Path, log_path: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        flags = ["--model_dir", str(model_dir), "--model_name", "sdxl", "--http_port", str(self.port),
                 "--enable_grpc", "false", "--device", args.device, "--dtype", args.dtype,
                 "--compile", args.compile, "--compile_mode", args.compile_mode,
                 "--compile_cache_dir", str(cache_dir), "--max_batch_images", str(args.max_batch_images),
                 "--max_queue", "256", "--enable_latency_logging", "false"]
        if args.fuse_qkv:
            flags.append("--fuse_qkv")
        if args.channels_last:
            flags.append("--channels_last")
        if args.compile != "none":
            flags += ["--warmup", f"{args.size}x{args.size}"]
        self.log_file = open(log_path, "a")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "sdserve", *flags], stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 1800) -> float:
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see its log")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready in time")

    def predict_timed(self, **params) -> tuple[float, dict]:
        """Latency seen by the client, and the server's own ``timings`` of the request."""
        start = time.perf_counter()
        r = httpx.post(f"{self.url}/v1/models/sdxl:predict", json={"instances": [{"prompt": PROMPT, **params}]},
                       timeout=1800)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["predictions"][0]["timings"]

    def predict(self, **params) -> float:
        return self.predict_timed(**params)[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log_file.close()


def throughput(server: Server, clients: int, requests_per_client: int, params: dict) -> dict:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda _: server.predict(**params), range(clients * requests_per_client)))
    elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "seconds": round(elapsed, 2),
            "images_per_s": round(len(latencies) / elapsed, 3), "latencies": latencies}
