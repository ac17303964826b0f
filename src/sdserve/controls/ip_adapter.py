"""IP-Adapters: a reference image steers the image through extra cross-attention keys and values.

A folder holds the weights in the original layout (``ip-adapter*.safetensors``: ``image_proj.*``
and ``ip_adapter.<n>.to_k_ip/to_v_ip``) and its CLIP image encoder (``image_encoder/``), as
diffusers' ``load_ip_adapter`` reads them. diffusers installs an IP-Adapter into the UNet for good
(new attention processors, an image projection, an input every call must then give). Here the
processors and projection are built with diffusers' own converters for the set of adapters a
denoiser call uses, installed for that call only, with a scale per row: a row without an
IP-Adapter gets scale 0, which the processor skips or multiplies away, so calls with and without
IP-Adapters share the UNet as before.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path

import torch

IMAGE_ENCODER = "image_encoder"
_KEEP_SETS = 4  # processor sets kept built (each holds its adapters' key/value weights once more)


def weights_file(folder: Path) -> str | None:
    """The folder's IP-Adapter weights: its only top-level ``.safetensors`` (``ip-adapter*`` first)."""
    files = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name.endswith(".safetensors"))
    named = [f for f in files if f.startswith("ip-adapter")]
    candidates = named or files
    return candidates[0] if len(candidates) == 1 else None


def read_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` as ``load_ip_adapter`` reads a safetensors file."""
    from safetensors import safe_open

    state = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = f.get_tensor(key)
    return state


class IPAdapter:
    """One loaded IP-Adapter: its weights and image encoder, on the worker's device."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        name = weights_file(folder)
        if name is None:
            raise ValueError(f"{folder.name}: no single ip-adapter*.safetensors")
        self.weights = read_weights(folder / name)
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(folder / IMAGE_ENCODER, torch_dtype=dtype)
        self.encoder.to(device).eval().requires_grad_(False)
        size = self.encoder.config.image_size
        self.processor = CLIPImageProcessor(size=size, crop_size=size)  # as load_ip_adapter makes it
        # The plain IP-Adapter projects the pooled image embedding; Plus and Full Face read hidden states.
        self.pooled = "proj.weight" in self.weights["image_proj"]
        self.dtype = dtype

    def embeds(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, negative) embeddings of a reference image or a list of ``k``, ``[1, k, ...]``: the
        pipelines' ``encode_image`` and ``prepare_ip_adapter_image_embeds`` for one adapter."""
        device = self.encoder.device
        pixels = self.processor(image, return_tensors="pt").pixel_values.to(device=device, dtype=self.dtype)
        if self.pooled:
            embeds = self.encoder(pixels).image_embeds
            return embeds[None], torch.zeros_like(embeds)[None]
        hidden = self.encoder(pixels, output_hidden_states=True).hidden_states[-2]
        negative = self.encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return hidden[None], negative[None]


class RowScale:
    """A scale per row for ``IPAdapterAttnProcessor2_0``, which skips an adapter whose scale is 0
    and otherwise adds ``scale * attention`` to the hidden states."""

    __hash__ = None

    def __init__(self, values: torch.Tensor):
        self.values = values  # (rows, 1, 1)

    def __eq__(self, other) -> bool:
        return bool(torch.all(self.values == other))

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.values * other

    __rmul__ = __mul__


class IPAdapterSets:
    """Attention processors and image projections for sets of IP-Adapters, built on first use
    with diffusers' converters and kept for the last few sets."""

    def __init__(self, unet):
        self.unet = unet
        self._sets: OrderedDict[tuple[str, ...], tuple[dict, torch.nn.Module]] = OrderedDict()
        self._attention = {name.removesuffix(".processor"): None for name in unet.attn_processors}
        for name, module in unet.named_modules():
            if name in self._attention:
                self._attention[name] = module

    def _build(self, names: tuple[str, ...], adapters: list[IPAdapter]) -> tuple[dict, torch.nn.Module]:
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        if names in self._sets:
            self._sets.move_to_end(names)
            return self._sets[names]
        unet, states = self.unet, [a.weights for a in adapters]
        processors = unet._convert_ip_adapter_attn_to_diffusers(states, low_cpu_mem_usage=False)
        layers = [unet._convert_ip_adapter_image_proj_to_diffusers(s["image_proj"], low_cpu_mem_usage=False)
                  for s in states]
        projection = MultiIPAdapterImageProjection(layers).to(device=unet.device, dtype=unet.dtype)
        for processor in processors.values():
            if isinstance(processor, torch.nn.Module):
                processor.to(device=unet.device, dtype=unet.dtype)
        self._sets[names] = (processors, projection)
        while len(self._sets) > _KEEP_SETS:
            self._sets.popitem(last=False)
        return self._sets[names]

    @contextlib.contextmanager
    def installed(self, names: tuple[str, ...], adapters: list[IPAdapter], scales: list[torch.Tensor]):
        """The UNet with these adapters' processors for one call, ``scales[i]`` (rows, 1, 1) each."""
        processors, projection = self._build(names, adapters)
        unet = self.unet
        originals = {name: module.processor for name, module in self._attention.items()}
        for processor in processors.values():
            if hasattr(processor, "to_k_ip"):
                processor.scale = [RowScale(s) for s in scales]
        kept = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
        try:
            for name, module in self._attention.items():
                module.set_processor(processors[f"{name}.processor"])
            unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = projection, "ip_image_proj"
            yield
        finally:
            for name, module in self._attention.items():
                module.set_processor(originals[name])
            unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = kept
