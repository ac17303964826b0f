"""Conditioning for prompts in a weighted syntax (``prompt_syntax`` compel or a1111), built by compel
as its own SD and SDXL wrappers build it: every token read, in 77-token chunks (75 of text between
the start and end markers), weights applied to the token embeddings, ``.and()`` parts (AUTOMATIC1111's
BREAK) each in chunks of their own, and the negative padded to the positive's length so that the two
rows of a guided image have one length. ``request/prompt_syntax.py`` turns AUTOMATIC1111's syntax
into compel's and checks both; what a plain prompt reads is not touched.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from compel import BaseTextualInversionManager, Compel, CompelForSD, CompelForSDXL, ReturnedEmbeddingsType

from ..models.embeddings import PromptVocabulary
from ..request.prompt_syntax import to_compel
from ..request.types import GenerationRequest


class _ExpandEmbeddings(BaseTextualInversionManager):
    """A multi-vector embedding's name stands for all its tokens (``name name_1 ...``), as diffusers'
    ``maybe_convert_prompt`` expands it; with the private tokenizer."""

    def __init__(self, pipeline, tokenizer):
        self.pipeline, self.tokenizer = pipeline, tokenizer

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        if not token_ids:
            return token_ids
        text = self.pipeline.maybe_convert_prompt(self.tokenizer.decode(token_ids), self.tokenizer)
        return self.tokenizer.encode(text, add_special_tokens=False)


class WeightedPrompts:
    """compel over one pipeline's text encoders and the private tokenizers (owned by the worker)."""

    def __init__(self, pipeline, vocabulary: PromptVocabulary, device: torch.device):
        self.names = vocabulary.names
        # SDXL without a negative prompt: zeros where the model says so (the base), else the empty prompt
        self.zero_negative = bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", False))
        # without embeddings there is nothing private to keep: the pipeline's own tokenizers serve
        tokenizers = vocabulary.tokenizers or {name: getattr(pipeline, name, None) for name in ("tokenizer", "tokenizer_2")}
        first = tokenizers.get("tokenizer") or tokenizers.get("tokenizer_2")
        manager = _ExpandEmbeddings(pipeline, first) if hasattr(pipeline, "maybe_convert_prompt") and first else None
        encoder, encoder_2 = getattr(pipeline, "text_encoder", None), getattr(pipeline, "text_encoder_2", None)
        view = SimpleNamespace(tokenizer=tokenizers.get("tokenizer"), text_encoder=encoder,
                               tokenizer_2=tokenizers.get("tokenizer_2"), text_encoder_2=encoder_2)
        if encoder is not None and encoder_2 is not None:  # SDXL base
            self.wrapper = CompelForSDXL(view, textual_inversion_manager=manager, device=device)
        elif encoder_2 is not None:  # SDXL refiner: the second encoder only, as its encode_prompt reads it
            self.wrapper = Compel(tokenizer=view.tokenizer_2, text_encoder=encoder_2, textual_inversion_manager=manager,
                                  returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                                  requires_pooled=True, truncate_long_prompts=False, device=device)
        else:  # SD 1.x/2.x
            self.wrapper = CompelForSD(view, textual_inversion_manager=manager, device=device)

    def _text(self, request: GenerationRequest, text: str | None) -> str | None:
        return None if text is None else to_compel(text, request.prompt_syntax, self.names)

    @torch.no_grad()
    def sd(self, request: GenerationRequest, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings, negative embeddings or None): the negative is the empty prompt when none is
        given, padded to the prompt's length (diffusers would encode it at 77)."""
        negative = self._text(request, request.negative(1)) if guided else None
        out = self.wrapper(self._text(request, request.prompt), negative_prompt=negative)
        return out.embeds, out.negative_embeds

    @torch.no_grad()
    def sdxl(self, request: GenerationRequest, guided: bool):
        """(embeddings, negative, pooled, negative pooled); without a negative prompt the negatives
        are None where the model zeroes them (as for plain prompts), else the empty prompt's."""
        negative = guided and (request.negative_prompt is not None or not self.zero_negative)
        out = self.wrapper(
            self._text(request, request.prompt),
            style_prompt=self._text(request, request.prompt_2 or request.prompt),
            negative_prompt=self._text(request, request.negative(1)) if negative else None,
            negative_style_prompt=self._text(request, request.negative(2)) if negative else None,
        )
        return out.embeds, out.negative_embeds, out.pooled_embeds, out.negative_pooled_embeds

    @torch.no_grad()
    def refiner(self, request: GenerationRequest, guided: bool):
        """The refiner's second-encoder conditioning, laid out as :meth:`sdxl`'s."""
        texts = [self._text(request, request.prompt_2 or request.prompt)]
        negative = guided and (request.negative_prompt is not None or not self.zero_negative)
        if negative:
            texts.append(self._text(request, request.negative(2)))
        embeds, pooled = self.wrapper(texts)
        if negative:
            return embeds[:1], embeds[1:], pooled[:1], pooled[1:]
        return embeds, None, pooled, None
