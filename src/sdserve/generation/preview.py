"""Cheap previews of an image in progress: the predicted clean latents (``Progress.denoised``, or
``Progress.latents`` when the scheduler gives no prediction) to a small RGB picture, never with
the model's full VAE.

Two ways:

* default, a fixed linear map from the latent channels to RGB, per model family (a few
  multiply-adds per latent pixel, then a nearest-neighbour upsample to the image's size);
* with ``tiny_vae_dir`` (the server's ``--preview_vae``), a diffusers ``AutoencoderTiny``
  (TAESD / TAESDXL / TAESD3) made for the family: sharper, and still far cheaper than the VAE.

Both take the model's latents as the step loop holds them: scaled by the VAE's scaling_factor,
and for SD3 also shifted (the denoiser works on ``(vae_latents - shift_factor) * scaling_factor``).
That is the space the public latent-to-RGB factors were fitted in, and the space the TAESD
decoders read (their diffusers configs carry scaling_factor 1.0 and shift_factor 0.0).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

# Latent-to-RGB factors, one row per latent channel, columns R, G, B; the result is in about
# [-1, 1] and shown as (x + 1) / 2. These are the public "Latent2RGB" preview coefficients of
# ComfyUI, comfy/latent_formats.py (classes SD15, SDXL and SD3, with their
# ``latent_rgb_factors`` / ``latent_rgb_factors_bias``; applied by latent_preview.py's
# Latent2RGBPreviewer to the sampler's x0, i.e. the model-space latents, then clamped to
# [-1, 1] and mapped to 0..255). The SD 1.x table is the same one AUTOMATIC1111's
# "Approx cheap" preview uses; it serves SD 2.x too (same VAE).
LATENT_RGB_FACTORS: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float] | None]] = {
    "sd": (
        (
            (0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177),
        ),
        None,
    ),
    "sdxl": (
        (
            (0.3651, 0.4232, 0.4341),
            (-0.2533, -0.0042, 0.1068),
            (0.1076, 0.1111, -0.0362),
            (-0.3165, -0.2492, -0.2188),
        ),
        (0.1084, -0.0175, -0.0011),
    ),
    "sd3": (
        (
            (-0.0922, -0.0175, 0.0749),
            (0.0311, 0.0633, 0.0954),
            (0.1994, 0.0927, 0.0458),
            (0.0856, 0.0339, 0.0902),
            (0.0587, 0.0272, -0.0496),
            (-0.0006, 0.1104, 0.0309),
            (0.0978, 0.0306, 0.0427),
            (-0.0042, 0.1038, 0.1358),
            (-0.0194, 0.0020, 0.0669),
            (-0.0488, 0.0130, -0.0268),
            (0.0922, 0.0988, 0.0951),
            (-0.0278, 0.0524, -0.0542),
            (0.0332, 0.0456, 0.0895),
            (-0.0069, -0.0030, -0.0810),
            (-0.0596, -0.0465, -0.0293),
            (-0.1448, -0.1463, -0.1189),
        ),
        (0.2394, 0.2135, 0.1925),
    ),
    "flux": (  # FLUX.1's 16-channel latents (unpacked, as sdserve keeps them between steps)
        (
            (-0.0346, 0.0244, 0.0681),
            (0.0034, 0.0210, 0.0687),
            (0.0275, -0.0668, -0.0433),
            (-0.0174, 0.0160, 0.0617),
            (0.0859, 0.0721, 0.0329),
            (0.0004, 0.0383, 0.0115),
            (0.0405, 0.0861, 0.0915),
            (-0.0236, -0.0185, -0.0259),
            (-0.0245, 0.0250, 0.1180),
            (0.1008, 0.0755, -0.0421),
            (-0.0515, 0.0201, 0.0011),
            (0.0428, -0.0012, -0.0036),
            (0.0817, 0.0765, 0.0749),
            (-0.1264, -0.0522, -0.1103),
            (-0.0280, -0.0881, -0.0499),
            (-0.1262, -0.0982, -0.0778),
        ),
        (-0.0329, -0.0718, -0.0851),
    ),
}

FAMILIES = tuple(LATENT_RGB_FACTORS)
FLAG = "--preview_vae"


class PreviewError(ValueError):
    """The previewer cannot be built as asked (unknown family, channel count, bad tiny VAE)."""


def linear_map(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's (C, 3) factors and (3,) bias, float32 on the CPU."""
    factors, bias = LATENT_RGB_FACTORS[family]
    weight = torch.tensor(factors, dtype=torch.float32)
    return weight, torch.tensor(bias if bias is not None else (0.0, 0.0, 0.0), dtype=torch.float32)


def _upsample(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 (h, w, 3) array to (height, width, 3)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(image)
    if height % h == 0 and width % w == 0:  # the usual case: a whole factor, plain repeats
        # along the columns first, then whole rows: several times faster than the other order
        return np.repeat(np.repeat(image, width // w, axis=1), height // h, axis=0)
    rows = (np.arange(height) * h) // height
    cols = (np.arange(width) * w) // width
    return image[rows][:, cols]


def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """(.., 3) values in about [-1, 1] to uint8 0..255, NaN as mid grey, rounding not truncating."""
    rgb = torch.nan_to_num(rgb, nan=0.0, posinf=1.0, neginf=-1.0)
    return rgb.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def _load_tiny_vae(tiny_vae_dir: str, latent_channels: int, device, dtype):
    folder = Path(tiny_vae_dir)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise PreviewError(f"{FLAG} {tiny_vae_dir}: no such directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise PreviewError(f"{FLAG} {tiny_vae_dir}: not a diffusers AutoencoderTiny folder: "
                           f"cannot read its config.json ({exc})") from exc
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderTiny":
        raise PreviewError(f"{FLAG} {tiny_vae_dir}: its config.json describes {kind!r}, "
                           "not an AutoencoderTiny (a TAESD: taesd, taesdxl or taesd3)")
    channels = config.get("latent_channels", 4)
    if channels != latent_channels:
        raise PreviewError(f"{FLAG} {tiny_vae_dir}: the tiny VAE has {channels} latent channels, "
                           f"the model {latent_channels}; use the TAESD made for this model's family")
    from diffusers import AutoencoderTiny

    try:
        vae = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                              use_safetensors=True)
    except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError... for a bad folder
        raise PreviewError(f"{FLAG} {tiny_vae_dir}: cannot load it as an AutoencoderTiny "
                           f"(config.json plus diffusion_pytorch_model.safetensors): {exc}") from exc
    return vae.to(device).eval().requires_grad_(False)


class Previewer:
    """Turns an image's predicted clean latents into a small RGB preview, never with the full VAE.

    ``previewer(latents)`` takes the model's latents, (1, C, h, w) (a batch gives its first image;
    (C, h, w) is taken too), on any device, and gives a uint8 numpy array
    (h * vae_scale_factor, w * vae_scale_factor, 3). It keeps no reference to the latents, so a
    progress hook may call it on the worker thread.
    """

    def __init__(self, family: str, latent_channels: int, vae_scale_factor: int = 8,
                 tiny_vae_dir: str | None = None, device="cpu", dtype=torch.float32):
        if family not in LATENT_RGB_FACTORS:
            raise PreviewError(f"no preview for model family {family!r}; families: {', '.join(FAMILIES)}")
        if int(vae_scale_factor) < 1:
            raise PreviewError(f"vae_scale_factor must be a positive integer, got {vae_scale_factor!r}")
        self.family = family
        self.latent_channels = int(latent_channels)
        self.vae_scale_factor = int(vae_scale_factor)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tiny_vae = None
        self.method = "linear"
        if tiny_vae_dir is not None:
            self.tiny_vae = _load_tiny_vae(tiny_vae_dir, self.latent_channels, self.device, dtype)
            self.method = "tiny_vae"
            config = self.tiny_vae.config
            self._scaling = float(getattr(config, "scaling_factor", 1.0) or 1.0)
            self._shift = float(getattr(config, "shift_factor", 0.0) or 0.0)
        else:
            weight, bias = linear_map(family)
            if weight.shape[0] != self.latent_channels:
                raise PreviewError(
                    f"the {family!r} latent-to-RGB preview map covers {weight.shape[0]} latent channels, "
                    f"this model has {self.latent_channels}; give a tiny VAE for it with {FLAG}")
            self._weight, self._bias = weight, bias
            self._weight_np, self._bias_np = weight.numpy(), bias.numpy()
            self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {torch.device("cpu"): (weight, bias)}
        self._lock = threading.Lock()

    def _map_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._on.get(device)
        if found is None:
            with self._lock:
                found = self._on.get(device)
                if found is None:
                    found = (self._weight.to(device), self._bias.to(device))
                    self._on[device] = found
        return found

    def _check(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (1, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        return latents[:1].detach()

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        latents = self._check(latents)
        height, width = latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor
        if self.tiny_vae is not None:
            small = self._decode_tiny(latents, height, width)
        elif latents.device.type == "cpu":
            small = self._linear_cpu(latents[0])
        else:
            small = self._linear_torch(latents[0])
        return _upsample(small, height, width)

    def _linear_torch(self, latents: torch.Tensor) -> np.ndarray:
        # On the accelerator, in float32: (3, C) @ (C, h*w) + bias; only the uint8 picture at
        # latent size crosses to the host.
        channels, h, w = latents.shape
        weight, bias = self._map_on(latents.device)
        rgb = torch.addmm(bias[:, None], weight.t(), latents.reshape(channels, h * w).float())
        return _to_uint8(rgb).reshape(3, h, w).permute(1, 2, 0).cpu().numpy()

    def _linear_cpu(self, latents: torch.Tensor) -> np.ndarray:
        # numpy's einsum runs this small contraction in one plain loop, on the calling thread: no
        # BLAS or intra-op thread pool to wake, which on a busy CPU costs more than the sums.
        channels, h, w = latents.shape
        flat = latents.float().numpy().reshape(channels, h * w)
        rgb = np.einsum("ck,cn->kn", self._weight_np, flat)
        rgb += self._bias_np[:, None]
        np.nan_to_num(rgb, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(rgb, -1.0, 1.0, out=rgb)
        rgb += 1.0
        rgb *= 127.5
        np.rint(rgb, out=rgb)
        return rgb.astype(np.uint8).reshape(3, h, w).transpose(1, 2, 0)

    def _decode_tiny(self, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
        # As the pipelines hand latents to their VAE: z / scaling_factor + shift_factor, which for
        # a TAESD (1.0 and 0.0) leaves the model latents as they are.
        z = latents.to(self.device, self.dtype) / self._scaling + self._shift
        image = self.tiny_vae.decode(z).sample  # (1, 3, H, W) in about [-1, 1]
        if image.shape[-2:] != (height, width):
            image = torch.nn.functional.interpolate(image.float(), size=(height, width), mode="bilinear",
                                                    align_corners=False)
        return _to_uint8(image[0].permute(1, 2, 0).float()).cpu().numpy()
