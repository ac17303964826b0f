"""The LoRA layers: peft adapters on the UNet's attention projections (and the text encoders'),
their state in checkpoints, and the final file in diffusers' LoRA format, which the servers'
``pipeline.load_lora_weights`` reads (as diffusers' ``train_dreambooth_lora_sdxl.py`` saves it)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import TrainModel
from .output import WEIGHTS

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "default"  # peft's name for the one adapter being trained


def component_names(model: TrainModel, train_text_encoder: bool) -> list[str]:
    """The pipeline components that get LoRA layers, in the order they are handed to accelerate."""
    names = ["unet"]
    if train_text_encoder:
        names += ["text_encoder", "text_encoder_2"] if model.family == "sdxl" else ["text_encoder"]
    return names


def add_adapters(model: TrainModel, names: list[str], rank: int, alpha: float, dropout: float) -> None:
    """Freeze everything, then add a trainable LoRA (fp32, whatever the frozen weights' dtype:
    small updates vanish in half precision) to each named component."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = model.pipe
    for component in (pipe.unet, pipe.vae, *model.text_encoders):
        component.requires_grad_(False)
    for name in names:
        targets = UNET_TARGETS if name == "unet" else TEXT_TARGETS
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                            target_modules=targets)
        module = getattr(pipe, name)
        if name == "unet":
            module.add_adapter(config, adapter_name=ADAPTER)
        else:
            # peft itself, not transformers' add_adapter: that one demands a newer peft than
            # diffusers' LoRA loading (what servers use) needs
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            module.peft_config = {ADAPTER: config}
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}


def save_checkpoint(modules: dict[str, torch.nn.Module], folder: Path) -> None:
    """The LoRA state of each component (nothing of the frozen weights: a checkpoint stays small)."""
    for name, module in modules.items():
        save_file(peft_state(module), folder / f"lora-{name}.safetensors")


def load_checkpoint(modules: dict[str, torch.nn.Module], folder: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    for name, module in modules.items():
        path = folder / f"lora-{name}.safetensors"
        state = load_file(path, device=str(next(module.parameters()).device))
        result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{path} does not fit this model (unexpected keys such as {unexpected[0]})")


def save_diffusers(model: TrainModel, modules: dict[str, torch.nn.Module], folder: Path) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA format, with each component's
    LoRA config as metadata (so an alpha other than the rank loads with the right scale)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers, metadata = {}, {}
    for name, module in modules.items():
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(peft_state(module))
        metadata[f"{name}_lora_adapter_metadata"] = module.peft_config[ADAPTER].to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    type(model.pipe).save_lora_weights(folder, weight_name=WEIGHTS, safe_serialization=True, **layers, **metadata)
    return folder / WEIGHTS
