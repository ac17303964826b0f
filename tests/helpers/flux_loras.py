"""FLUX LoRA files in the kohya layout (``lora_unet_double_blocks_0_img_attn_proj.lora_down.weight``),
as kohya's sd-scripts and most community FLUX LoRAs save them; diffusers' FLUX loader converts them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def write_kohya_flux_lora(transformer, folder: Path, seed: int, rank: int = 4) -> Path:
    """A random LoRA on the first double block's image and text attention outputs and the first
    single block's output projection of ``transformer``."""
    torch.manual_seed(seed)
    double, single = transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]
    layers = {"double_blocks_0_img_attn_proj": double.attn.to_out[0],
              "double_blocks_0_txt_attn_proj": double.attn.to_add_out, "single_blocks_0_linear2": single.proj_out}
    state = {}
    for name, linear in layers.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, linear.in_features) * 0.3
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(linear.out_features, rank) * 0.3
        state[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "kohya_flux_lora.safetensors")
    return folder
