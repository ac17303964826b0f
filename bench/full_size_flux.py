"""Full-size random-weight FLUX.1 ([schnell] or [dev]) from its published architecture: the real
compute and memory cost, no download (~34 GB of bfloat16 weights: 11.9B transformer, 4.8B T5-XXL).

    python bench/full_size_flux.py /tmp/flux-random --device cuda            # [schnell]
    python bench/full_size_flux.py /tmp/flux-random --device cuda --dev      # [dev]: guidance embedded

Weights are drawn N(0, 0.02) (biases 0), created on ``--device`` in bfloat16; images are noise.
Tokenizers are sdserve's small ones (their ids fit the real vocabularies).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from full_size import _tame  # bench/ is on the path, as for bench/preview.py

# FLUX.1's transformer/config.json, text encoders (CLIP ViT-L/14, T5 v1.1 XXL) and VAE (16 channels)
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   axes_dims_rope=(16, 56, 56))
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
T5 = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
          feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
           use_post_quant_conv=False)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15)


def build(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, dev: bool = False):
    """A FluxPipeline with random weights of FLUX.1's sizes, on ``device``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sdserve.tiny import clip_tokenizer
    from sdserve.tiny.tokenizers import t5_tokenizer

    scratch = Path(tempfile.mkdtemp())
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in their serving precision: no float32 copy of 12B weights
    try:
        with torch.device(device):
            transformer = _tame(FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=dev))
            text_encoder = _tame(CLIPTextModel(CLIPTextConfig(**CLIP)))
            text_encoder_2 = _tame(T5EncoderModel(T5Config(**T5)))
            vae = _tame(AutoencoderKL(**VAE))
    finally:
        torch.set_default_dtype(default)
    # [dev]: shift 3 grown with the image's size; [schnell]: shift 1, fixed
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, **SCHEDULER)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=clip_tokenizer(scratch / "tok", "<|endoftext|>"), text_encoder_2=text_encoder_2,
                        tokenizer_2=t5_tokenizer(), transformer=transformer)


def parameters(dev: bool = False) -> dict[str, int]:
    """Parameters of each component, counted on the meta device (nothing allocated)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        parts = {"transformer": FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=dev),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP)),
                 "text_encoder_2": T5EncoderModel(T5Config(**T5)), "vae": AutoencoderKL(**VAE)}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dev", action="store_true", help="FLUX.1 [dev] (guidance embedded); default [schnell]")
    args = parser.parse_args()
    started = time.perf_counter()
    pipe = build(args.device, dev=args.dev)
    pipe.save_pretrained(args.dest, safe_serialization=True)
    print(f"wrote a full-size random FLUX.1 [{'dev' if args.dev else 'schnell'}] to {args.dest} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
