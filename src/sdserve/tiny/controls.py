"""Tiny random-weight control models for the tiny SD and SDXL pipelines: a ``ControlNetModel``
shaped like their UNet, a ``T2IAdapter`` whose features fit its down blocks and an IP-Adapter
(its ``image_encoder/`` and ``ip-adapter.safetensors`` in the original key layout diffusers'
``load_ip_adapter`` reads). Real ControlNets start with zero convolutions (no effect until
trained); these get random weights throughout, so that a control visibly changes the image."""

from __future__ import annotations

from pathlib import Path

import torch

from .denoisers import tiny_unet

CONTROL_KINDS = {"sd-controlnet": "sd", "sdxl-controlnet": "sdxl", "sd-t2i-adapter": "sd",
                 "sdxl-t2i-adapter": "sdxl", "sd-ip-adapter": "sd", "sdxl-ip-adapter": "sdxl"}
IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"


def build_control(kind: str, seed: int = 0):
    """A tiny ControlNet or T2I-Adapter of ``kind`` (one of :data:`CONTROL_KINDS`)."""
    from diffusers import ControlNetModel, T2IAdapter

    torch.manual_seed(seed)
    family = CONTROL_KINDS[kind]
    if kind.endswith("t2i-adapter"):
        # Two features: after the UNet's first down block (16 channels, 1/2 the latents) and its
        # second (32, 1/4); the third block and the middle take none, as the list runs out.
        return T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=16,
                          adapter_type="full_adapter")
    controlnet = ControlNetModel.from_unet(_family_unet(family), conditioning_embedding_out_channels=(8, 8, 16, 16),
                                           load_weights_from_unet=False)
    _randomise(controlnet.controlnet_down_blocks, 0.3)
    _randomise(controlnet.controlnet_mid_block, 0.3)
    _randomise(controlnet.controlnet_cond_embedding.conv_out, 0.3)
    return controlnet


def _family_unet(family: str):
    """A UNet shaped like the tiny ``family`` pipeline's (random weights)."""
    if family == "sdxl":
        return tiny_unet(cross_attention_dim=64, time_ids=6)
    return tiny_unet(cross_attention_dim=32, time_ids=None)


def write_ip_adapter(dest: Path, family: str, seed: int = 0) -> Path:
    """A tiny IP-Adapter for the tiny ``family`` UNet: a CLIP vision encoder (32x32 images) and the
    image projection and per-cross-attention key/value weights, numbered as the original
    checkpoints are (1, 3, 5, ...: every other attention processor, the cross-attention ones)."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8))
    encoder.save_pretrained(dest / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(dest / "image_encoder")
    unet = _family_unet(family)
    cross = unet.config.cross_attention_dim
    weights = {"image_proj.proj.weight": torch.randn(4 * cross, 16) * 0.3,
               "image_proj.proj.bias": torch.randn(4 * cross) * 0.1,
               "image_proj.norm.weight": torch.ones(cross) + torch.randn(cross) * 0.1,
               "image_proj.norm.bias": torch.randn(cross) * 0.1}
    key_id = 1
    for name, module in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        for which in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key_id}.{which}.weight"] = torch.randn(hidden, cross) / cross ** 0.5
        key_id += 2
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dest / IP_ADAPTER_WEIGHTS))
    return dest


def _hidden_size(unet, name: str) -> int:
    """An attention processor's width, as diffusers' IP-Adapter loader works it out."""
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name[len("up_blocks.")])]
    return channels[int(name[len("down_blocks.")])]


def _randomise(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, std / max(1, parameter[0].numel()) ** 0.5)


def write_control(dest: str | Path, kind: str, seed: int = 0) -> Path:
    """A tiny control model of ``kind`` saved as a diffusers folder at ``dest``."""
    dest = Path(dest)
    if kind.endswith("ip-adapter"):
        return write_ip_adapter(dest, CONTROL_KINDS[kind], seed)
    build_control(kind, seed).save_pretrained(dest, safe_serialization=True)
    return dest
