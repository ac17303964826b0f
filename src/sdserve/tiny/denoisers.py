"""The tiny UNets and VAEs of the tiny pipelines (and of the control models for the UNets)."""

from __future__ import annotations


def tiny_vae(latent_channels: int = 4, **options):
    """A four-level VAE like the real ones (8x down-sampling, so sizes behave as they do for SDXL);
    SD3 and FLUX.1 use 16 latent channels and their own ``options`` (scaling, shift, no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=256,
        **options,
    )


def tiny_unet(cross_attention_dim: int, time_ids: int | None, text_embed_dim: int = 32, in_channels: int = 4):
    """A three-level UNet with attention only at the lowest level (cheap at 1024x1024); with
    ``time_ids`` it takes SDXL's added text/time conditioning; ``in_channels`` 9 makes an
    inpainting UNet (latents, mask, masked-image latents)."""
    from diffusers import UNet2DConditionModel

    extra = {}
    if time_ids is not None:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=time_ids * 8 + text_embed_dim,
        )
    return UNet2DConditionModel(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        **extra,
    )
