"""Tiny random-weight pipelines built from the real diffusers/transformers classes.

They load through the same code as real models (``save_pretrained`` then the model store), run
in milliseconds on a CPU, and back the tests and the demo server. Images are noise-like: the
weights are random, only the machinery is real.

    sdserve tiny-model DIR --kind sdxl-refiner   # DIR/base + DIR/refiner
    sdserve tiny-model DIR --kind sdxl           # DIR is one diffusers folder
    sdserve tiny-model DIR --kind sd             # an SD 2.x-style folder
    sdserve tiny-model DIR --kind sd3            # StableDiffusion3Pipeline with a tiny T5
    sdserve tiny-model DIR --kind sd-single-file # DIR/model.safetensors (original layout) + DIR/config/
    sdserve tiny-model DIR --loras trex,pixel    # also DIR/loras/<name>/pytorch_lora_weights.safetensors
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

KINDS = ("sdxl", "sdxl-refiner", "sd", "sd3", "sd-single-file")

# A few words to learn BPE merges from, so the tokenizer is a real (if small) CLIP BPE.
_CORPUS = """
a photo of an astronaut riding a horse on the moon, highly detailed, sharp focus, studio lighting
portrait of a dog in a field of flowers at sunset, oil painting, trending, cinematic, 4k
a cat sitting on a red chair in a sunny kitchen, watercolor, soft light, beautiful landscape
mountains and a lake under the stars, digital art, photorealistic, ugly, blurry, deformed
"""
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_SCHEDULER = {  # SDXL base 1.0's own scheduler settings
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "num_train_timesteps": 1000,
}


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2 byte-level alphabet: every byte as a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Plain BPE merge learning over the words of ``text`` (CLIP marks word ends with </w>)."""
    words = Counter(text.lower().replace(",", " ").split())
    vocab = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in words.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, n in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for word, n in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = n
        vocab = merged
    return merges


def write_clip_tokenizer_files(dest: Path, merges_count: int = 96) -> int:
    """Write vocab.json and merges.txt of a small CLIP BPE tokenizer; return the vocab size."""
    alphabet = _bytes_to_unicode()
    merges = _learn_merges(_CORPUS, merges_count)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + list(_SPECIALS)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def clip_tokenizer(scratch: Path, pad_token: str):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(scratch)
    return CLIPTokenizer(
        vocab=str(scratch / "vocab.json"),
        merges=str(scratch / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


def _text_config(tokenizer, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32 if projection else 512,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four levels like the real VAE: 8x down-sampling, so sizes behave as they do for SDXL.
    return AutoencoderKL(
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )


def _unet(cross_attention_dim: int, time_ids: int | None, text_embed_dim: int = 32):
    """A three-level UNet with attention only at the lowest level (cheap at 1024x1024); with
    ``time_ids`` it takes SDXL's added text/time conditioning."""
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
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        **extra,
    )


def build_sdxl(scratch: Path, with_refiner: bool = False, seed: int = 0):
    """(base, refiner or None): a tiny SDXL base and optionally its refiner sharing text_encoder_2/vae."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(scratch / "tok1", "<|endoftext|>")
    tokenizer_2 = clip_tokenizer(scratch / "tok2", "!")
    base = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, projection=False)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, projection=True)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(cross_attention_dim=64, time_ids=6),
        scheduler=EulerDiscreteScheduler(**_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )
    refiner = None
    if with_refiner:
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=base.vae,
            text_encoder=None,
            text_encoder_2=base.text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer_2,
            # the refiner conditions on text_encoder_2 only, and on an aesthetic score (5 time ids)
            unet=_unet(cross_attention_dim=32, time_ids=5),
            scheduler=EulerDiscreteScheduler(**_SCHEDULER),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    return base, refiner


def build_sd(scratch: Path, seed: int = 0):
    """A tiny SD 2.x-style StableDiffusionPipeline (one text encoder, no added conditioning)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(scratch / "tok", "<|endoftext|>")
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, projection=False)),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=32, time_ids=None),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _t5_tokenizer():
    """A small T5 (Unigram, SentencePiece-style) tokenizer built from the corpus's words."""
    from transformers import T5Tokenizer

    words = sorted(set(_CORPUS.lower().replace(",", " ").split()))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in words]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)] + [(str(d), -5.0) for d in range(10)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_sd3(scratch: Path, seed: int = 0):
    """A tiny StableDiffusion3Pipeline: MMDiT transformer, two CLIP encoders and a T5 encoder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(scratch / "tok1", "<|endoftext|>")
    tokenizer_2 = clip_tokenizer(scratch / "tok2", "!")
    tokenizer_3 = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_ff=37, d_kv=8, num_layers=2,
                                 num_heads=4, pad_token_id=0, eos_token_id=1))
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=96,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(
            block_out_channels=[8, 8, 16, 16], layers_per_block=1, in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=16, norm_num_groups=8, sample_size=256, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        ),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, projection=True)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, projection=True)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )


def write_lora(pipeline, dest: Path, seed: int) -> Path:
    """A small random LoRA on the denoiser's attention projections, made with peft and saved in
    the diffusers LoRA format (``pytorch_lora_weights.safetensors``), as diffusers' DreamBooth
    LoRA training scripts save it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers.utils import convert_state_dict_to_diffusers

    torch.manual_seed(seed)
    denoiser_name = "transformer" if hasattr(pipeline, "transformer") else "unet"
    denoiser = getattr(pipeline, denoiser_name)
    # init_lora_weights=False: random, non-zero LoRA so that it visibly changes images
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="tiny")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name="tiny"))
    denoiser.delete_adapters("tiny")
    type(pipeline).save_lora_weights(dest, safe_serialization=True, **{f"{denoiser_name}_lora_layers": layers})
    return dest


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


def save_pipeline(pipeline, dest: Path) -> None:
    """save_pretrained, with tokenizers stored as vocab.json + merges.txt as in the SDXL repos
    (so loading goes through the same files a real model has)."""
    pipeline.save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        folder = dest / name
        if folder.is_dir():
            (folder / "tokenizer.json").unlink(missing_ok=True)
            write_clip_tokenizer_files(folder)


def write_tiny_model(dest: str | Path, kind: str = "sdxl-refiner", seed: int = 0, loras: tuple[str, ...] = ()) -> Path:
    """Build a tiny model of ``kind`` and save it under ``dest`` in a layout sdserve serves;
    each name in ``loras`` adds ``dest/loras/<name>/``."""
    import tempfile

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as scratch:
        if kind in ("sd", "sd-single-file"):
            base = build_sd(Path(scratch), seed)
            write_single_file(base, dest) if kind == "sd-single-file" else save_pipeline(base, dest)
        elif kind == "sd3":
            base = build_sd3(Path(scratch), seed)
            save_pipeline(base, dest)
        elif kind == "sdxl":
            base, _ = build_sdxl(Path(scratch), seed=seed)
            save_pipeline(base, dest)
        else:
            base, refiner = build_sdxl(Path(scratch), with_refiner=True, seed=seed)
            save_pipeline(base, dest / "base")
            save_pipeline(refiner, dest / "refiner")
        for i, name in enumerate(loras):
            write_lora(base, dest / "loras" / name, seed=seed + 1 + i)
    return dest
