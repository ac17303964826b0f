"""The model being fine-tuned: loaded by the server's own model store (so what trains is what is
served), and the pieces of its text conditioning the training step computes itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import loading
from ..models.layout import ModelLayout, ModelStoreError, discover
from ..models.loading import LoadedModel
from .options import InputError


@dataclass
class TrainModel:
    loaded: LoadedModel
    family: str  # "sd" or "sdxl"

    @property
    def pipe(self):
        return self.loaded.base

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def text_encoders(self) -> list:
        encoders = [self.pipe.text_encoder]
        return encoders + [self.pipe.text_encoder_2] if self.family == "sdxl" else encoders

    @property
    def tokenizers(self) -> list:
        tokenizers = [self.pipe.tokenizer]
        return tokenizers + [self.pipe.tokenizer_2] if self.family == "sdxl" else tokenizers

    def noise_scheduler(self):
        """The training-time noising of the model's own schedule (betas, prediction type)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.loaded.scheduler_config)

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids per text encoder, padded to its length, as the pipelines tokenize."""
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in self.tokenizers]

    def encode(self, ids: list[torch.Tensor], encoders: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embeddings or None) as the pipelines' encode_prompt makes them.
        ``encoders`` are the (possibly distributed-wrapped) modules to call when they train."""
        encoders = encoders or self.text_encoders
        device = self.loaded.device
        if self.family == "sd":
            encoder = self.text_encoders[0]
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                mask = (ids[0] != self.tokenizers[0].pad_token_id).long().to(device)
            return encoders[0](ids[0].to(device), attention_mask=mask)[0], None
        # SDXL: the penultimate hidden states of both encoders side by side; pooled from the second
        hidden, pooled = [], None
        for encoder, token_ids in zip(encoders, ids):
            out = encoder(token_ids.to(device), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def unet_kwargs(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
        """SDXL's added conditioning (pooled text and micro-conditioning time ids); none for SD."""
        if self.family == "sd":
            return {}
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], size: int) -> list[int]:
    """SDXL micro-conditioning: original size, crop corner, target size."""
    return [*original_size, *crop_top_left, size, size]


def load(model_dir: str, family: str, device: torch.device, dtype: torch.dtype) -> TrainModel:
    """The base pipeline only (a refiner beside it is not trained), on ``device`` in ``dtype``."""
    try:
        layout = discover(model_dir)
        loaded = loading.load(ModelLayout(base=layout.base, config=layout.config), device, dtype)
    except ModelStoreError as exc:
        raise InputError(f"--model_dir: {exc}") from None
    return TrainModel(loaded, family)
