"""The fixed set of sampler names a request may ask for, and how each is built.

Names follow the ones users know from web UIs ("DPM++ 2M Karras"); each maps to a diffusers
scheduler class plus config overrides, built from the loaded model's own scheduler config so the
model's beta schedule and timestep spacing are kept (a request's timestep_spacing overrides the
latter). Diffusion models (SD, SDXL) and flow-matching models (SD3) have separate sets: a sampler of
one family cannot drive the other. Which request fields a sampler reads (eta, timestep_spacing,
timesteps) its diffusers class says (``sampler_fields``)."""

from __future__ import annotations

import functools
import inspect
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
    "LCM": ("LCMScheduler", {}),  # consistency-distilled models (LCM, LCM-LoRA)
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "PNDM": ("PNDMScheduler", {}),
    "TCD": ("TCDScheduler", {}),  # trajectory-consistency-distilled models (TCD-LoRA)
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


SPACINGS = ("leading", "linspace", "trailing")  # diffusers' timestep_spacing values
# TCD's own step default, which its authors pass; the pipelines pass eta=0.0 to every other sampler.
DEFAULT_ETA = {"TCDScheduler": 0.3}
# Their set_timesteps picks from the distillation schedule (original_inference_steps) and never
# reads timestep_spacing, though their config has it: a spacing would silently do nothing.
_OWN_SPACING = {"LCMScheduler", "TCDScheduler"}
# diffusers refuses custom timesteps with these sigma schedules (a model's own config may set them
# too; validation cannot see that, and such a request fails alone when it is planned).
_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _class_name(scheduler: str | None, model_scheduler_class: str, family: str) -> str:
    return FAMILIES[family][scheduler][0] if scheduler else model_scheduler_class


def min_steps(scheduler: str | None, model_scheduler_class: str, family: str = "diffusion") -> int:
    """Fewest num_inference_steps the named scheduler (None: the model's own) can run."""
    return _MIN_STEPS.get(_class_name(scheduler, model_scheduler_class, family), 1)


def max_steps(scheduler: str | None, model_scheduler_class: str, family: str = "diffusion") -> int | None:
    """Most num_inference_steps it can run, where it has a bound: LCM's and TCD's schedules are a
    subset of their original_inference_steps (by default; a model's own config may say otherwise)."""
    cls = getattr(diffusers, _class_name(scheduler, model_scheduler_class, family), None)
    bound = inspect.signature(cls.__init__).parameters.get("original_inference_steps") if cls else None
    return bound.default if bound is not None else None


def default_eta(scheduler: str | None, model_scheduler_class: str, family: str = "diffusion") -> float | None:
    """eta for a request that gives none; None: the pipelines' 0.0 where the step takes eta."""
    return DEFAULT_ETA.get(_class_name(scheduler, model_scheduler_class, family))


@functools.cache
def sampler_fields(scheduler: str | None, model_scheduler_class: str, family: str = "diffusion") -> frozenset[str]:
    """Which of the request fields eta, timestep_spacing and timesteps the sampler (None: the
    model's own) reads: its diffusers class's step, config and set_timesteps say."""
    cls_name = _class_name(scheduler, model_scheduler_class, family)
    overrides = FAMILIES[family][scheduler][1] if scheduler else {}
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        return frozenset()
    takes = set()
    if "eta" in inspect.signature(cls.step).parameters:
        takes.add("eta")
    if "timestep_spacing" in inspect.signature(cls.__init__).parameters and cls_name not in _OWN_SPACING:
        takes.add("timestep_spacing")
    if "timesteps" in inspect.signature(cls.set_timesteps).parameters and not any(
        overrides.get(key) for key in _SIGMA_SCHEDULES
    ):
        takes.add("timesteps")
    return frozenset(takes)


def samplers_taking(field: str, family: str = "diffusion") -> list[str]:
    """The sampler names of ``family`` that read request field ``field``."""
    return [name for name in FAMILIES[family] if field in sampler_fields(name, "", family)]


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


def build_scheduler(name: str | None, base_config: Any, seeds: list[int] | None = None, family: str = "diffusion",
                    timestep_spacing: str | None = None):
    """A fresh scheduler for one image, or one pipeline call (schedulers are stateful, never shared).

    ``name`` None rebuilds the model's own scheduler. ``seeds`` (one per image) seed the Brownian
    noise of the SDE samplers per image, so batched images equal unbatched ones.
    ``timestep_spacing`` (None: the model's) overrides the config's, as
    ``Cls.from_config(config, timestep_spacing=...)`` does.
    """
    if name is None:
        cls_name, overrides = base_config["_class_name"], {}
    else:
        cls_name, overrides = FAMILIES[family][name]
    if timestep_spacing is not None:
        overrides = {**overrides, "timestep_spacing": timestep_spacing}
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
