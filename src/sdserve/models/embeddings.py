"""Textual-inversion embeddings (``--embeddings_dir``): one ``<name>.safetensors`` each, loaded with
diffusers' ``load_textual_inversion`` at start-up and named in weighted prompts by ``name``.

They go into private copies of the tokenizers, so a ``plain`` prompt still reads exactly what
diffusers reads (a word that happens to be an embedding's name stays that word). The text encoders
are the pipeline's own: their token embeddings gain rows that only the private tokenizers
address, which leaves every other prompt as it was and keeps LoRA adapters on the encoders working
for weighted prompts too. Files: diffusers' and AUTOMATIC1111's single-encoder formats (SD 1.x/2.x),
and ``clip_l`` + ``clip_g`` (SDXL); pickled ``.pt``/``.bin`` embeddings are refused, as for models.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layout import PICKLE_SUFFIXES, ModelStoreError

log = logging.getLogger("sdserve")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKENIZERS = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))


@dataclass
class PromptVocabulary:
    """The tokenizers weighted prompts are read with (private copies, with the embeddings' tokens)."""

    tokenizers: dict[str, Any] = field(default_factory=dict)  # "tokenizer", "tokenizer_2" -> a private copy
    names: frozenset[str] = frozenset()


def private_copy(tokenizer):
    """A tokenizer of its own: saved and loaded again (a deep copy of a fast CLIP tokenizer decodes
    differently from the original, and compel decodes and encodes prompts to expand embeddings)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return type(tokenizer).from_pretrained(folder)


def _vectors(state: dict[str, Any], path: Path, parts: list[str]) -> dict[str, Any]:
    """The embedding's vectors per encoder part (clip_l, clip_g) of a model with ``parts``."""
    if "clip_l" in state or "clip_g" in state:  # SDXL's format
        missing = [p for p in parts if p not in state]
        if missing or len(parts) < 2:
            raise ModelStoreError(f"textual-inversion embedding {path.name} holds {', '.join(sorted(state))}; this model's "
                                  f"text encoders need {', '.join(parts)}")
        return {p: state[p] for p in parts}
    if len(parts) > 1:
        raise ModelStoreError(f"textual-inversion embedding {path.name} is for one text encoder (SD 1.x/2.x); an SDXL "
                              "embedding holds clip_l and clip_g")
    tensor = state.get("emb_params")  # AUTOMATIC1111's safetensors
    if tensor is None and len(state) == 1:  # diffusers': {token: vectors}
        tensor = next(iter(state.values()))
    if tensor is None:
        raise ModelStoreError(f"textual-inversion embedding {path.name}: unknown layout (keys {', '.join(sorted(state))})")
    return {parts[0]: tensor}


def load_embeddings(pipeline, folder: Path | None) -> PromptVocabulary:
    """Private tokenizers for weighted prompts, with every embedding in ``folder`` loaded; raises
    ModelStoreError naming the file that does not fit this model."""
    from safetensors.torch import load_file

    present = [(tok, enc, part) for tok, enc, part in TOKENIZERS if getattr(pipeline, tok, None) is not None
               and getattr(pipeline, enc, None) is not None]
    vocabulary = PromptVocabulary({tok: private_copy(getattr(pipeline, tok)) for tok, _, _ in present})
    if folder is None or not folder.is_dir():
        return vocabulary
    names = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix in PICKLE_SUFFIXES:
            log.warning("textual-inversion embedding %s skipped: pickle files are refused; use .safetensors", path.name)
            continue
        if path.suffix != ".safetensors":
            continue
        name = path.stem
        if not NAME.match(name):
            log.warning("textual-inversion embedding %s skipped: names are letters, digits, '.', '_', '-'", path.name)
            continue
        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a bad file
            raise ModelStoreError(f"textual-inversion embedding {path.name} is not a readable safetensors file: {exc}") \
                from None
        vectors = _vectors(state, path, [part for _, _, part in present])
        for tok, enc, part in present:
            try:
                pipeline.load_textual_inversion(vectors[part], token=name, tokenizer=vocabulary.tokenizers[tok],
                                                text_encoder=getattr(pipeline, enc))
            except ValueError as exc:
                raise ModelStoreError(f"textual-inversion embedding {path.name} does not fit {enc}: {exc}") from None
        names.append(name)
    vocabulary.names = frozenset(names)
    if names:
        log.info("textual-inversion embeddings from %s: %s", folder, ", ".join(names))
    return vocabulary
