"""Original-layout (LDM / A1111-style) single-file checkpoints of tiny SD pipelines: the inverse
of diffusers' single-file conversion, so the single-file loading path is tested for real."""

from __future__ import annotations

from pathlib import Path

from .tokenizers import save_pipeline


def _ldm_unet(unet) -> dict:
    """A diffusers UNet state dict in the original (LDM) layout: the inverse of diffusers'
    ``convert_ldm_unet_checkpoint`` for SD-style UNets."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # diffusers name -> original name
    renames = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    per_level = unet.config.layers_per_block + 1
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if key in top:
            new = top[key]
        elif parts[0] == "mid_block":
            index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
            new = _ldm_block(f"middle_block.{index}", parts[1], parts[3:], renames)
        elif parts[0] in ("down_blocks", "up_blocks") and parts[2] == "downsamplers":
            new = f"input_blocks.{(int(parts[1]) + 1) * per_level}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] in ("down_blocks", "up_blocks") and parts[2] == "upsamplers":
            level = int(parts[1])
            position = 2 if hasattr(unet.up_blocks[level], "attentions") else 1
            new = f"output_blocks.{level * per_level + per_level - 1}.{position}.conv.{'.'.join(parts[5:])}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            down = parts[0] == "down_blocks"
            index = (1 if down else 0) + int(parts[1]) * per_level + int(parts[3])
            head = f"{'input_blocks' if down else 'output_blocks'}.{index}.{0 if parts[2] == 'resnets' else 1}"
            new = _ldm_block(head, parts[2], parts[4:], renames)
        else:
            raise ValueError(f"no original-layout name for UNet weight {key}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def _ldm_block(head: str, kind: str, rest: list[str], renames) -> str:
    tail = ".".join(rest)
    if kind == "resnets":
        for diffusers_name, ldm_name in renames:
            tail = tail.replace(diffusers_name, ldm_name)
    return f"{head}.{tail}"


def _ldm_vae(vae) -> dict:
    """The inverse of diffusers' ``convert_ldm_vae_checkpoint``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attention = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    levels = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        if key in top:
            new = top[key]
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
            side = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = f"{parts[0]}.{side}.{level}.block.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{parts[0]}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            tail = ".".join(parts[4:])
            for diffusers_name, ldm_name in attention:
                tail = tail.replace(diffusers_name, ldm_name)
            new = f"{parts[0]}.mid.attn_1.{tail}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise ValueError(f"no original-layout name for VAE weight {key}")
        out[f"first_stage_model.{new}"] = value
    return out


def write_single_file(pipeline, dest: Path) -> Path:
    """Save an SD-style pipeline as one original-layout ``.safetensors`` (UNet, VAE, CLIP text
    encoder, as A1111-style checkpoints are) plus the diffusers configs it needs, without weights."""
    from safetensors.torch import save_file

    weights = {**_ldm_unet(pipeline.unet), **_ldm_vae(pipeline.vae)}
    # original checkpoints name CLIP's weights text_model.*; newer transformers drop that level
    weights.update({
        f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
        for k, v in pipeline.text_encoder.state_dict().items()
    })
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, dest / "model.safetensors")
    config = dest / "config"
    save_pipeline(pipeline, config)
    for weights_file in config.glob("*/*.safetensors"):
        weights_file.unlink()  # the config folder holds configs and tokenizers only
    return dest / "model.safetensors"
