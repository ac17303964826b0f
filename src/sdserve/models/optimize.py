"""Speed-ups for the loaded pipelines, each behind a flag whose default is off (the plain diffusers
path), and each checked to keep images within a small tolerance of that path.

* ``fuse_qkv``: one matmul for attention's query, key and value projections.
* ``channels_last``: NHWC memory layout for the UNet and VAE convolutions (tensor cores prefer it).
* ``compile``: ``torch.compile`` of the denoiser (``denoiser``) or of the denoiser and the VAE
  decoder (``all``); ``compile_mode`` picks inductor's mode (``reduce-overhead`` adds CUDA graphs).
  Shapes are specialised: every (size, row count) compiles once, so the step loop pads its calls to
  a few row counts and the ``warmup`` sizes run each of them once at start-up, on the worker
  thread, before the server reports ready. Compiled kernels are cached
  in ``TORCHINDUCTOR_CACHE_DIR`` (``--compile_cache_dir``): keep it on a volume for fast restarts.

Attention already uses PyTorch's scaled-dot-product attention (flash / memory-efficient kernels on
GPUs), diffusers' default; ``--dtype bfloat16`` runs SDXL's VAE without the float32 up-cast that
float16 needs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("sdserve")

COMPILE_TARGETS = ("none", "denoiser", "all")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Optimizations:
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: str = "none"
    compile_mode: str = "default"
    warmup: tuple[tuple[int, int], ...] = ()  # (width, height) generated once at start-up
    compile_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_TARGETS:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_TARGETS)}, got {self.compile!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")

    @property
    def any(self) -> bool:
        return self.fuse_qkv or self.channels_last or self.compile != "none"


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"1024x1024,768x1344" -> ((1024, 1024), (768, 1344))."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            width, height = (int(n) for n in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"sizes are WIDTHxHEIGHT separated by commas, got {part!r}") from None
        sizes.append((width, height))
    return tuple(sizes)


def _denoiser(pipeline):
    return pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet


def apply(pipeline, opts: Optimizations, include_vae: bool = True) -> list[str]:
    """Apply ``opts`` to one pipeline in place; returns what was done, for the log.
    ``include_vae`` False for a refiner, whose VAE is the base's (already done)."""
    done = []
    if opts.compile_cache_dir:
        # inductor and Triton read these when they first compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = opts.compile_cache_dir
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(opts.compile_cache_dir, "triton"))
    denoiser = _denoiser(pipeline)
    if opts.fuse_qkv:
        if hasattr(pipeline, "fuse_qkv_projections"):
            pipeline.fuse_qkv_projections(unet=True, vae=include_vae)
        else:  # SD3: the transformer fuses its own
            denoiser.fuse_qkv_projections()
        done.append("fused QKV")
    if opts.channels_last:
        denoiser.to(memory_format=torch.channels_last)
        if include_vae:
            pipeline.vae.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if opts.compile != "none":
        denoiser.compile(mode=opts.compile_mode)
        done.append(f"compiled {type(denoiser).__name__} ({opts.compile_mode})")
        if opts.compile == "all" and include_vae:
            pipeline.vae.decoder.compile(mode=opts.compile_mode)
            done.append("compiled the VAE decoder")
    return done
