"""Tiny random-weight pipelines built from the real diffusers/transformers classes.

They load through the same code as real models (``save_pretrained`` then the model store), run
in milliseconds on a CPU, and back the tests and the demo server. Images are noise-like: the
weights are random, only the machinery is real.

    sdserve tiny-model DIR --kind sdxl-refiner   # DIR/base + DIR/refiner
    sdserve tiny-model DIR --kind sdxl           # DIR is one diffusers folder
    sdserve tiny-model DIR --kind sd             # an SD 2.x-style folder
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

KINDS = ("sdxl", "sdxl-refiner", "sd")

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


def _tokenizer(scratch: Path, pad_token: str):
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
    tokenizer = _tokenizer(scratch / "tok1", "<|endoftext|>")
    tokenizer_2 = _tokenizer(scratch / "tok2", "!")
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
    tokenizer = _tokenizer(scratch / "tok", "<|endoftext|>")
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


def _save(pipeline, dest: Path) -> None:
    """save_pretrained, with tokenizers stored as vocab.json + merges.txt as in the SDXL repos
    (so loading goes through the same files a real model has)."""
    pipeline.save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        folder = dest / name
        if folder.is_dir():
            (folder / "tokenizer.json").unlink(missing_ok=True)
            write_clip_tokenizer_files(folder)


def write_tiny_model(dest: str | Path, kind: str = "sdxl-refiner", seed: int = 0) -> Path:
    """Build a tiny model of ``kind`` and save it under ``dest`` in a layout sdserve serves."""
    import tempfile

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as scratch:
        if kind == "sd":
            _save(build_sd(Path(scratch), seed), dest)
        elif kind == "sdxl":
            base, _ = build_sdxl(Path(scratch), seed=seed)
            _save(base, dest)
        else:
            base, refiner = build_sdxl(Path(scratch), with_refiner=True, seed=seed)
            _save(base, dest / "base")
            _save(refiner, dest / "refiner")
    return dest
