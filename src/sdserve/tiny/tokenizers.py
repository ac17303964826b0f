"""A small but real CLIP BPE tokenizer (``vocab.json`` + ``merges.txt`` learnt from a few lines
of text), and saving tiny pipelines with their tokenizers in those files, as the SDXL repos have."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# A few words to learn BPE merges from, so the tokenizer is a real (if small) CLIP BPE.
_CORPUS = """
a photo of an astronaut riding a horse on the moon, highly detailed, sharp focus, studio lighting
portrait of a dog in a field of flowers at sunset, oil painting, trending, cinematic, 4k
a cat sitting on a red chair in a sunny kitchen, watercolor, soft light, beautiful landscape
mountains and a lake under the stars, digital art, photorealistic, ugly, blurry, deformed
"""
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")

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


def t5_tokenizer():
    """A small T5 (Unigram, SentencePiece-style) tokenizer built from the corpus's words."""
    from transformers import T5Tokenizer

    words = sorted(set(_CORPUS.lower().replace(",", " ").split()))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in words]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)] + [(str(d), -5.0) for d in range(10)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)  # as the SD3 and FLUX repos'


def save_pipeline(pipeline, dest: Path) -> None:
    """save_pretrained, with tokenizers stored as vocab.json + merges.txt as in the SDXL repos
    (so loading goes through the same files a real model has)."""
    pipeline.save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # CLIP's (FLUX's tokenizer_2 is T5's: kept as saved)
        folder = dest / name
        if folder.is_dir() and type(getattr(pipeline, name)).__name__.startswith("CLIP"):
            (folder / "tokenizer.json").unlink(missing_ok=True)
            write_clip_tokenizer_files(folder)
