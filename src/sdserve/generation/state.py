"""What the step loop holds for each admitted image: plain data, touched by the worker thread only."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .admission import Job

_ids = itertools.count()


class Phase(Protocol):
    """What the step loop reads of the phase an image is in (``families.common.Phase`` is one)."""

    name: str  # "base" or "refiner"
    uses_adapters: bool  # LoRA adapters apply to its denoiser


@dataclass(eq=False)
class Rows:
    """One request's conditioning for one denoiser: keyword tensors, each with one leading row.
    ``uncond`` is None without classifier-free guidance (guidance <= 1): one row per image."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    uid: int = field(default_factory=lambda: next(_ids))  # identity for caching concatenations


@dataclass(eq=False)
class Schedule:
    """One phase of one image: its own scheduler and the timesteps it will call the denoiser at."""

    phase: Phase
    rows: Rows
    scheduler: Any
    timesteps: torch.Tensor  # the scheduler's own values, handed back to scheduler.step
    times: list[float]  # the same as numbers: the denoiser's per-row timestep input
    step_kwargs: dict[str, Any]  # eta / generator, as the pipeline passes them to scheduler.step
    begin: Any = None  # what the phase needs to start its latents (e.g. the noise timestep)
    # The timesteps a ControlNet's start/end are fractions of: the pipeline's loop's, before an
    # ensemble refiner's cut (None: ``times``).
    span: int | None = None


@dataclass(eq=False)
class Inpaint:
    """An inpainting image's mask (latent size, 1 = repaint) and what keeps the rest: the
    original's latents and noise (4-channel denoiser), or the masked image's latents (inpainting
    denoiser)."""

    mask: torch.Tensor
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    masked_latents: torch.Tensor | None = None


@dataclass(eq=False)
class FeatureCache:
    """One image's reused features (``feature_cache.py``), kept for the phase that made them."""

    mode: str  # deep | first_block
    interval: int = 3  # deep: the deep blocks run every this many steps
    threshold: float = 0.1  # first_block: skip while the first block's residual changed less than this
    phase: str | None = None  # the phase (denoiser) the features below belong to
    deep: torch.Tensor | None = None  # deep: what entered the last up block at the last full step, per row
    head: torch.Tensor | None = None  # first_block: the first block's residual at the last full step
    tail: torch.Tensor | None = None  # first_block: what the other blocks added at the last full step
    ran: list[str] = field(default_factory=list)  # per denoiser call: "full" or "cached" (what ran)


@dataclass(eq=False)
class ImageState:
    """One image in flight: its schedules (current first), latents, generator and progress."""

    job: Job
    index: int  # within its request
    seed: int
    generator: torch.Generator
    schedules: list[Schedule]  # phases still to run, the current one first
    total_steps: int  # denoiser calls over all phases
    order: int  # admission order, for fair tie-breaks
    latents: torch.Tensor | None = None
    denoised: torch.Tensor | None = None
    step: int = 0  # denoiser calls done in the current phase
    steps_done: int = 0  # denoiser calls done in all phases
    waited: int = 0  # calls of its group that left it out since it last stepped
    inpaint: Inpaint | None = None
    own_calls: tuple = ()  # LoRA adapters only peft's own path serves: calls with just this set
    cache: FeatureCache | None = None  # features reused between steps (request.cache)
    controls: Any = None  # control.RequestControls: its request's ControlNet images and adapter features

    @property
    def schedule(self) -> Schedule:
        return self.schedules[0]

    @property
    def remaining(self) -> int:
        return self.total_steps - self.steps_done

    @property
    def phase_done(self) -> bool:
        return self.step >= len(self.schedule.times)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance at this step: the request asks for it, and the image is within
        its ``guidance_interval`` (fractions of all its denoiser calls)."""
        if self.schedule.rows.uncond is None:
            return False
        lo, hi = self.job.request.guidance_interval
        return lo <= self.steps_done / self.total_steps < hi

    @property
    def rows(self) -> int:
        """Denoiser rows it needs per step: two with classifier-free guidance, else one."""
        return 2 if self.guided else 1

    def group_key(self) -> tuple:
        """Images with equal keys can share a denoiser call (see policy.py)."""
        phase = self.schedule.phase
        text = self.schedule.rows.cond.get("encoder_hidden_states")
        return (phase.name, tuple(self.latents.shape[1:]), self.own_calls if phase.uses_adapters else (),
                text.shape[1] if text is not None else 0,
                self.controls.references if self.controls is not None and phase.name == "base" else ())
