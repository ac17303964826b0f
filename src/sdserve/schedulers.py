"""The fixed set of sampler names a request may ask for, and how each is built.

Names follow the ones users know from web UIs ("DPM++ 2M Karras"); each maps to a diffusers
scheduler class plus config overrides, built from the loaded model's own scheduler config so the
model's beta schedule and timestep spacing are kept. Diffusion models (SD, SDXL) and flow-matching
models (SD3) have separate sets: a sampler of one family cannot drive the other.
"""

from __future__ import annotations

from typing import Any

import diffusers

# canonical name -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "PNDM": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


# Flow-matching samplers, for SD3-style models.
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "Heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
FAMILIES = {"diffusion": SCHEDULERS, "flow": FLOW_SCHEDULERS}

# PNDM's Runge-Kutta warm-up needs this many steps; fewer crash inside diffusers.
_MIN_STEPS = {"PNDMScheduler": 4}


def min_steps(scheduler: str | None, model_scheduler_class: str, family: str = "diffusion") -> int:
    """Fewest num_inference_steps the named scheduler (None: the model's own) can run."""
    cls_name = FAMILIES[family][scheduler][0] if scheduler else model_scheduler_class
    return _MIN_STEPS.get(cls_name, 1)


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _index(table: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, str]:
    by_key = {_normalise(name): name for name in table}
    by_key.update({_normalise(cls): name for name, (cls, extra) in table.items() if not extra})
    return by_key


_BY_KEY = {family: _index(table) for family, table in FAMILIES.items()}


def resolve_scheduler_name(name: str, family: str = "diffusion") -> str:
    """Map a user-given name (any case, '_' or '-' for spaces, or a diffusers class name) to the
    canonical one of the model's family; raises KeyError with the allowed names."""
    try:
        return _BY_KEY[family][_normalise(name)]
    except KeyError:
        raise KeyError(f"unknown scheduler {name!r}; allowed: {', '.join(FAMILIES[family])}") from None


def build_scheduler(name: str | None, base_config: Any, seeds: list[int] | None = None, family: str = "diffusion"):
    """A fresh scheduler for one image, or one pipeline call (schedulers are stateful, never shared).

    ``name`` None rebuilds the model's own scheduler. ``seeds`` (one per image) seed the Brownian
    noise of the SDE samplers per image, so batched images equal unbatched ones.
    """
    if name is None:
        cls_name, overrides = base_config["_class_name"], {}
    else:
        cls_name, overrides = FAMILIES[family][name]
    cls = MemoisedLMSDiscreteScheduler if cls_name == "LMSDiscreteScheduler" else getattr(diffusers, cls_name)
    scheduler = cls.from_config(base_config, **overrides)
    if hasattr(scheduler, "noise_sampler_seed") and seeds is not None:
        scheduler.noise_sampler_seed = list(seeds)
    return scheduler


class MemoisedLMSDiscreteScheduler(diffusers.LMSDiscreteScheduler):
    """diffusers' LMS sampler, remembering its linear multistep coefficients.

    Each step integrates them numerically (scipy's quad over tensor arithmetic): about 5 ms of CPU
    per image and step, which stalls every other image's step on the GPU worker. They depend only
    on the sigmas around the step, the same for every image with the same schedule, so each is
    computed once, by diffusers' own code, and reused: the values are the same floats.
    """

    _coefficients: dict[tuple, float] = {}
    _most = 100_000

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        key = (order, current_order, tuple(self.sigmas[t - order + 1 : t + 2].tolist()))
        cached = self._coefficients.get(key)
        if cached is None:
            if len(self._coefficients) >= self._most:
                self._coefficients.clear()
            cached = self._coefficients[key] = super().get_lms_coefficient(order, t, current_order)
        return cached
