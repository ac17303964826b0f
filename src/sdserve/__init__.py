"""sdserve: a KServe predictor for Stable Diffusion text-to-image models."""

__version__ = "0.1.0"
