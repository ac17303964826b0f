"""Progress previews (sdserve.generation.preview): the linear latent-to-RGB map per family, the
TAESD path with a tiny random AutoencoderTiny, the errors, and what a preview costs against a
denoising step."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest
import torch

from sdserve.generation.preview import LATENT_RGB_FACTORS, Previewer, PreviewError, _upsample

FAMILIES = [("sd", 4), ("sdxl", 4), ("sd3", 16), ("flux", 16)]


def expected_colour(family: str, channel_values) -> list[int]:
    """The colour of a latent pixel holding ``channel_values``, straight from the coefficient table."""
    factors, bias = LATENT_RGB_FACTORS[family]
    bias = bias or (0.0, 0.0, 0.0)
    out = []
    for k in range(3):
        x = bias[k] + sum(v * row[k] for v, row in zip(channel_values, factors))
        out.append(int(np.rint((min(max(x, -1.0), 1.0) + 1.0) * 127.5)))
    return out


def tiny_vae(folder, latent_channels: int, seed: int = 0, **config):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=latent_channels,
        **config,
    )
    vae.save_pretrained(folder)
    return vae.eval()


def as_uint8(decoded: torch.Tensor) -> np.ndarray:
    """A (1, 3, H, W) decode in [-1, 1] as a uint8 (H, W, 3) picture."""
    return ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


# --- the linear map ---------------------------------------------------------------------------


@pytest.mark.parametrize("family,channels", FAMILIES)
def test_shape_dtype_and_range(family, channels):
    previewer = Previewer(family, channels)
    assert previewer.method == "linear"
    latents = torch.randn(1, channels, 12, 20, generator=torch.Generator().manual_seed(1))
    image = previewer(latents)
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.shape == (96, 160, 3)
    assert image.std() > 0  # random latents make a varied picture


def test_coefficient_tables_have_the_published_shapes():
    for family, channels in FAMILIES:
        factors, bias = LATENT_RGB_FACTORS[family]
        assert len(factors) == channels and all(len(row) == 3 for row in factors)
        assert bias is None if family == "sd" else len(bias) == 3


@pytest.mark.parametrize("family,channels", FAMILIES)
def test_zero_latents_give_the_bias_colour(family, channels):
    image = Previewer(family, channels)(torch.zeros(1, channels, 4, 4))
    assert (image == np.array(expected_colour(family, [0.0] * channels), dtype=np.uint8)).all()


def test_known_colours_spelled_out():
    # independent of the table: colours worked by hand from ComfyUI's factors, (x + 1) * 127.5
    assert Previewer("sd", 4)(torch.zeros(1, 4, 1, 1))[0, 0].tolist() == [128, 128, 128]
    assert Previewer("sdxl", 4)(torch.zeros(1, 4, 1, 1))[0, 0].tolist() == [141, 125, 127]
    assert Previewer("sd3", 16)(torch.zeros(1, 16, 1, 1))[0, 0].tolist() == [158, 155, 152]
    assert Previewer("flux", 16)(torch.zeros(1, 16, 1, 1))[0, 0].tolist() == [123, 118, 117]
    one_hot = torch.zeros(1, 4, 1, 1)
    one_hot[0, 0] = 1.0  # SD 1.x channel 0: (0.3512, 0.2297, 0.3227)
    assert Previewer("sd", 4)(one_hot)[0, 0].tolist() == [172, 157, 169]


@pytest.mark.parametrize("family,channels", FAMILIES)
def test_constant_latents_map_through_the_coefficients(family, channels):
    values = torch.linspace(-1.5, 1.5, channels)
    latents = values.view(1, channels, 1, 1).expand(1, channels, 3, 2).contiguous()
    image = Previewer(family, channels)(latents)
    want = np.array(expected_colour(family, values.tolist()), dtype=np.int16)
    assert np.abs(image.astype(np.int16) - want).max() <= 1  # float32 sums may round the other way


def test_out_of_range_and_non_finite_values_clamp():
    previewer = Previewer("sdxl", 4)
    big = previewer(torch.full((1, 4, 2, 2), 1000.0))
    small = previewer(torch.full((1, 4, 2, 2), -1000.0))
    assert set(np.unique(big)) <= {0, 255} and set(np.unique(small)) <= {0, 255}
    nan = previewer(torch.full((1, 4, 2, 2), float("nan")))
    assert (nan == 128).all()


def test_upsampling_to_pixel_size_is_nearest():
    latents = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    full = Previewer("sd", 4)(latents)
    small = Previewer("sd", 4, vae_scale_factor=1)(latents)
    assert full.shape == (24, 40, 3) and small.shape == (3, 5, 3)
    for i in range(3):
        for j in range(5):
            assert (full[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] == small[i, j]).all()
    assert Previewer("sd", 4, vae_scale_factor=4)(latents).shape == (12, 20, 3)


def test_upsample_to_a_size_that_is_not_a_multiple():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = _upsample(image, 5, 7)
    assert out.shape == (5, 7, 3)
    assert (out[0, 0] == image[0, 0]).all() and (out[-1, -1] == image[-1, -1]).all()


def test_input_forms_and_dtypes():
    previewer = Previewer("sdxl", 4)
    latents = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    first = previewer(latents[:1])
    assert (previewer(latents) == first).all()  # a batch gives its first image
    assert (previewer(latents[0]) == first).all()  # (C, h, w)
    half = previewer(latents[:1].to(torch.bfloat16))
    assert half.shape == first.shape and np.abs(half.astype(int) - first.astype(int)).max() <= 3
    with pytest.raises(ValueError, match=r"\(1, 4, h, w\)"):
        previewer(torch.zeros(1, 16, 6, 6))
    with pytest.raises(TypeError):
        previewer(np.zeros((1, 4, 6, 6), dtype=np.float32))


def test_torch_path_matches_the_numpy_path():
    # the accelerator path (torch addmm) and the CPU path (numpy einsum) agree; run the torch one on CPU
    for family, channels in FAMILIES:
        previewer = Previewer(family, channels)
        latents = torch.randn(channels, 16, 16, generator=torch.Generator().manual_seed(4)) * 2
        a, b = previewer._linear_cpu(latents), previewer._linear_torch(latents)
        assert a.shape == b.shape == (16, 16, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_latents_match_cpu():
    previewer = Previewer("sd3", 16, device="cuda")
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    on_gpu, on_cpu = previewer(latents.cuda()), previewer(latents)
    assert on_gpu.shape == on_cpu.shape == (256, 256, 3)
    assert np.abs(on_gpu.astype(int) - on_cpu.astype(int)).max() <= 1


def test_bad_construction():
    with pytest.raises(PreviewError, match="family .kandinsky."):
        Previewer("kandinsky", 4)
    with pytest.raises(PreviewError, match="covers 4 latent channels.*16"):
        Previewer("sdxl", 16)
    with pytest.raises(PreviewError, match="covers 16 latent channels"):
        Previewer("sd3", 4)
    with pytest.raises(PreviewError, match="vae_scale_factor"):
        Previewer("sd", 4, vae_scale_factor=0)
    assert issubclass(PreviewError, ValueError)


# --- the TAESD path -------------------------------------------------------------------------


@pytest.mark.parametrize("family,channels", FAMILIES)
def test_tiny_vae_decodes_the_model_latents(tmp_path, family, channels):
    vae = tiny_vae(tmp_path / "taesd", channels)
    previewer = Previewer(family, channels, tiny_vae_dir=str(tmp_path / "taesd"))
    assert previewer.method == "tiny_vae"
    latents = torch.randn(1, channels, 4, 6, generator=torch.Generator().manual_seed(6))
    image = previewer(latents)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    with torch.no_grad():  # TAESD's configs carry scaling 1.0 and shift 0.0: the model latents go in as they are
        want = as_uint8(vae.decode(latents).sample)
    assert np.abs(image.astype(int) - want.astype(int)).max() <= 1


def test_tiny_vae_scaling_and_shift_are_applied_as_pipelines_do(tmp_path):
    vae = tiny_vae(tmp_path / "taesd", 16, scaling_factor=2.0, shift_factor=0.5)
    previewer = Previewer("sd3", 16, tiny_vae_dir=str(tmp_path / "taesd"))
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = as_uint8(vae.decode(latents / 2.0 + 0.5).sample)
    assert np.abs(previewer(latents).astype(int) - want.astype(int)).max() <= 1


def test_tiny_vae_output_is_resized_to_the_pixel_size(tmp_path):
    tiny_vae(tmp_path / "taesd", 4)  # upsamples by 8
    image = Previewer("sd", 4, vae_scale_factor=4, tiny_vae_dir=str(tmp_path / "taesd"))(torch.randn(1, 4, 5, 3))
    assert image.shape == (20, 12, 3)


def test_bad_tiny_vae_folders_name_the_flag(tmp_path):
    with pytest.raises(PreviewError, match="--preview_vae .*no such directory"):
        Previewer("sdxl", 4, tiny_vae_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreviewError, match="--preview_vae .*config.json"):
        Previewer("sdxl", 4, tiny_vae_dir=str(tmp_path / "empty"))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("{not json")
    with pytest.raises(PreviewError, match="--preview_vae"):
        Previewer("sdxl", 4, tiny_vae_dir=str(tmp_path / "garbage"))
    (tmp_path / "kl").mkdir()  # a full VAE, not a tiny one
    (tmp_path / "kl" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    with pytest.raises(PreviewError, match="--preview_vae .*AutoencoderKL.*not an AutoencoderTiny"):
        Previewer("sdxl", 4, tiny_vae_dir=str(tmp_path / "kl"))
    tiny_vae(tmp_path / "taesd4", 4)
    with pytest.raises(PreviewError, match="--preview_vae .*4 latent channels, the model 16"):
        Previewer("sd3", 16, tiny_vae_dir=str(tmp_path / "taesd4"))
    (tmp_path / "taesd4" / "diffusion_pytorch_model.safetensors").unlink()  # the config without weights
    with pytest.raises(PreviewError, match="--preview_vae .*cannot load"):
        Previewer("sdxl", 4, tiny_vae_dir=str(tmp_path / "taesd4"))


# --- cost -------------------------------------------------------------------------------------


@torch.inference_mode()
def test_linear_preview_costs_well_under_five_percent_of_a_guided_step(tmp_path):
    """One linear preview against one guided (batch 2) tiny-SDXL UNet call at 512x512 on CPU, taken
    in turn and compared by their medians; in practice it is a fraction of a percent."""
    from diffusers import UNet2DConditionModel

    from sdserve.tiny import write_tiny_model

    unet = UNet2DConditionModel.from_pretrained(write_tiny_model(tmp_path / "sdxl", "sdxl") / "unet").eval()
    config = unet.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, 4, 64, 64, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, config.cross_attention_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, config.projection_class_embeddings_input_dim
                                       - 6 * config.addition_time_embed_dim, generator=g),
            "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512]] * 2),
        },
    )
    previewer = Previewer("sdxl", 4)
    latents = inputs["sample"][:1]
    assert previewer(latents).shape == (512, 512, 3)
    unet(**inputs)  # warm up
    steps, previews = [], []
    for _ in range(3):
        start = time.perf_counter()
        unet(**inputs)
        steps.append(time.perf_counter() - start)
        for _ in range(5):
            start = time.perf_counter()
            previewer(latents)
            previews.append(time.perf_counter() - start)
    step, preview = statistics.median(steps), statistics.median(previews)
    assert preview < 0.05 * step, f"preview {preview * 1e3:.2f} ms, step {step * 1e3:.1f} ms"
