"""Soak / load test: N concurrent clients for M minutes against a real server.

    python bench/soak.py --minutes 5 --clients 16            # starts its own tiny-model server
    python bench/soak.py --url http://host:8080 --model sdxl  # or loads a running one

The traffic mixes v1, v2 and OpenAI requests, with some invalid ones, some that ask for a deadline
too short to meet, and some that hang up early. It reports requests by outcome, latency
percentiles of the successful ones, the server's RSS at the start and the end (when it started the
server), and whether it still answers health checks. Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    model = workdir / "model"
    subprocess.run([sys.executable, "-m", "sdserve", "tiny-model", str(model), "--kind", "sdxl-refiner"],
                   check=True, capture_output=True)
    port = free_port()
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdserve", "--model_dir", str(model), "--model_name", "sdxl",
         "--http_port", str(port), "--grpc_port", str(free_port()), "--max_side", "256", "--max_steps", "8",
         "--enable_latency_logging", "false", *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: see {workdir / 'server.log'}")
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def one_request(client: httpx.Client, model: str, rng: random.Random) -> tuple[str, float]:
    """Send one request of a random kind; return (outcome, seconds)."""
    kind = rng.choices(["v1", "v2", "openai", "invalid", "deadline", "hangup"], [40, 25, 15, 10, 5, 5])[0]
    steps = rng.randint(2, 6)
    size = rng.choice([64, 128, 256])
    start = time.perf_counter()
    try:
        if kind == "v1":
            r = client.post(f"/v1/models/{model}:predict", json={"instances": [
                {"prompt": "soak test", "num_inference_steps": steps, "width": size, "height": size,
                 "num_images": rng.randint(1, 2), "scheduler": rng.choice(["Euler a", "DDIM", "UniPC"])}]})
        elif kind == "v2":
            r = client.post(f"/v2/models/{model}/infer", json={
                "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["soak test"]}],
                "parameters": {"num_inference_steps": steps, "width": size, "height": size}})
        elif kind == "openai":
            r = client.post("/openai/v1/images/generations", json={
                "prompt": "soak test", "size": f"{size}x{size}", "num_inference_steps": steps})
        elif kind == "invalid":
            r = client.post(f"/v1/models/{model}:predict", json={"instances": [{"prompt": "x", "width": 7}]})
        elif kind == "deadline":
            r = client.post(f"/v1/models/{model}:predict", headers={"x-request-timeout": "0.05"}, json={
                "instances": [{"prompt": "late", "num_inference_steps": 8, "width": 256, "height": 256}]})
        else:  # the client gives up early and closes the connection
            try:
                client.post(f"/v1/models/{model}:predict", timeout=0.05, json={
                    "instances": [{"prompt": "gone", "num_inference_steps": 8, "width": 256, "height": 256}]})
            except httpx.TimeoutException:
                return "hangup", time.perf_counter() - start
            return "hangup-completed", time.perf_counter() - start
        return f"{kind}:{r.status_code}", time.perf_counter() - start
    except httpx.HTTPError as exc:
        return f"{kind}:{type(exc).__name__}", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one on a tiny model)")
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    parser.add_argument("server_args", nargs="*", help="extra flags for the server this script starts")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sdserve-soak-"))
    proc, url = (None, args.url) if args.url else start_server(workdir, args.server_args)
    # warm up (first calls allocate), then take the baseline RSS
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(5):
            one_request(client, args.model, random.Random(1))
    rss_start = rss_mib(proc.pid) if proc else None

    outcomes: Counter = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.minutes * 60

    def client_loop(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop_at:
                outcome, seconds = one_request(client, args.model, rng)
                with lock:
                    outcomes[outcome] += 1
                    if outcome.endswith(":200"):
                        latencies.append(seconds)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    healthy = httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    rss_end = rss_mib(proc.pid) if proc else None

    latencies.sort()
    pct = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None  # noqa: E731
    server_errors = sum(n for k, n in outcomes.items() if k.split(":")[-1].startswith("5") and not k.startswith("deadline"))
    report = {
        "clients": args.clients,
        "minutes": round(elapsed / 60, 2),
        "requests": sum(outcomes.values()),
        "ok": len(latencies),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "outcomes": dict(sorted(outcomes.items())),
        "unexpected_5xx": server_errors,
        "latency_s": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": latencies[-1] if latencies else None,
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "rss_mib": {"start": rss_start, "end": rss_end,
                    "growth": round(rss_end - rss_start, 1) if rss_start is not None else None},
        "healthy_after": healthy,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if proc:
        proc.terminate()
        proc.wait(60)
    if server_errors or not healthy:
        sys.exit(1)


if __name__ == "__main__":
    main()
