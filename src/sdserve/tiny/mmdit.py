"""Tiny transformer (MMDiT) pipelines: SD3 (and SD3.5's options) and FLUX.1, with CLIP and T5 text
encoders, built from the real diffusers/transformers classes."""

from __future__ import annotations

from pathlib import Path

import torch

from .denoisers import tiny_vae
from .text_config import text_config as _text_config
from .tokenizers import clip_tokenizer, t5_tokenizer


def _vae(**options):
    """The 16-channel VAE of SD3 and FLUX.1 (their scaling and shift), without quant convs."""
    return tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, **options)


def _t5(vocabulary: int):
    """A two-layer T5 encoder for the tiny T5 tokenizer."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocabulary, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1))


def build_sd3(scratch: Path, seed: int = 0, sd35: bool = False):
    """A tiny StableDiffusion3Pipeline: MMDiT transformer, two CLIP encoders and a T5 encoder; with
    ``sd35`` the transformer has SD3.5's options on (dual-attention layers, RMS qk norm)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(scratch / "tok1", "<|endoftext|>")
    tokenizer_2 = clip_tokenizer(scratch / "tok2", "!")
    tokenizer_3 = t5_tokenizer()
    t5 = _t5(len(tokenizer_3))
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, num_layers=10 if sd35 else 2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=96,
            # SD3.5 Medium's options on: dual attention in the first blocks, RMS qk norm (10 blocks, so
            # that the skip-layer guidance its card suggests, layers 7-9, applies as written)
            **({"dual_attention_layers": (0, 1, 2), "qk_norm": "rms_norm"} if sd35 else {}),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, projection=True)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, projection=True)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )


def build_flux(scratch: Path, seed: int = 0, guidance: bool = True, fill: bool = False):
    """A tiny FluxPipeline: a FLUX transformer over 2x2-packed 16-channel latents, CLIP (pooled) and
    T5; ``guidance`` embeds the guidance scale as FLUX.1 [dev] does ([schnell] has none). ``fill``
    makes a FluxFillPipeline (FLUX.1 Fill [dev]): the transformer also reads the masked image's
    packed latents (64 channels) and the mask folded 8x8 into channels and packed (256)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(scratch / "tok1", "<|endoftext|>")
    tokenizer_2 = t5_tokenizer()
    t5 = _t5(len(tokenizer_2))
    return (FluxFillPipeline if fill else FluxPipeline)(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=384 if fill else 64, out_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
            axes_dims_rope=[4, 6, 6],
        ),
        # FLUX.1's own: the shift grows with the image's size (use_dynamic_shifting)
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0 if guidance else 1.0, use_dynamic_shifting=guidance,
                                                  base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                  max_image_seq_len=4096),
        vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_text_config(tokenizer, projection=False)),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
    )
