"""Plain diffusers as existing runtimes call it (float16 on CUDA, defaults, one pipeline call per
request), in a process of its own that stays up, so that run.py can alternate its calls with the
server's: on a shared machine speed drifts over minutes, and only interleaved samples compare.

    worker:  python bench/baseline.py MODEL_DIR --device cuda   (reads JSON commands on stdin)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(model_dir: Path, device: torch.device) -> None:
    from diffusers import StableDiffusionXLPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir / "base", torch_dtype=dtype, use_safetensors=True)
    pipe.to(device).set_progress_bar_config(disable=True)
    print(json.dumps({"dtype": str(dtype)}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        call = dict(prompt=PROMPT, num_images_per_prompt=command["images"], width=command["size"],
                    height=command["size"], num_inference_steps=command["steps"], guidance_scale=command["guidance"])
        stamps: list[float] = []

        def on_step(pipeline, step, timestep, tensors):
            sync(device)
            stamps.append(time.perf_counter())
            return {}

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        pipe(**call, callback_on_step_end=on_step)
        sync(device)
        print(json.dumps({
            "seconds": time.perf_counter() - start,
            "unet_it_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        }), flush=True)


class Baseline:
    """The worker process, driven from run.py."""

    def __init__(self, model_dir: Path, device: str, size: int):
        self.size = size
        self.proc = subprocess.Popen([sys.executable, __file__, str(model_dir), "--device", device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def call(self, steps: int, guidance: float = 5.0, images: int = 1) -> dict:
        command = {"images": images, "size": self.size, "steps": steps, "guidance": guidance}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline process exited with {self.proc.wait()}")
        return json.loads(line)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    _worker(args.model_dir, torch.device(args.device))
