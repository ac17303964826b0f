"""Fault injection for tests, off unless its environment variables are set.

``SDSERVE_FAULT_OOM_PIXELS=N``: a denoiser call of more than N pixels (images x width x height)
raises an out-of-memory error, as a GPU would. ``SDSERVE_FAULT_HANG_PROMPT=text``: a batch with
that prompt sleeps before its first denoising step for ``SDSERVE_FAULT_HANG_SECONDS`` (default 3600),
as a wedged GPU would. They let the OOM recovery and the stuck-worker watchdog be tested on a CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


class InjectedOutOfMemory(RuntimeError):
    """Looks like the allocator's error to the code under test ("out of memory" in the message)."""


@dataclass(frozen=True)
class Faults:
    oom_pixels: int | None = None
    hang_prompt: str | None = None
    hang_seconds: float = 3600.0

    @classmethod
    def from_env(cls) -> "Faults":
        env = os.environ
        oom = env.get("SDSERVE_FAULT_OOM_PIXELS")
        return cls(
            oom_pixels=int(oom) if oom else None,
            hang_prompt=env.get("SDSERVE_FAULT_HANG_PROMPT") or None,
            hang_seconds=float(env.get("SDSERVE_FAULT_HANG_SECONDS", "3600")),
        )

    def before_call(self, images: int, width: int, height: int) -> None:
        if self.oom_pixels is not None and images * width * height > self.oom_pixels:
            raise InjectedOutOfMemory(
                f"CUDA out of memory (injected: {images} x {width}x{height} > {self.oom_pixels} pixels)"
            )

    def on_first_step(self, prompts: list[str]) -> None:
        """Called with the prompts of the images about to take their first step."""
        if self.hang_prompt is not None and self.hang_prompt in prompts:
            time.sleep(self.hang_seconds)
