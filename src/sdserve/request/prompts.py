"""What the text encoders will actually read of a prompt.

CLIP encoders read 77 tokens (start and end markers included); diffusers drops the rest. sdserve
generates anyway and says so in the response, so a client learns why the end of a long prompt had
no effect.
"""

from __future__ import annotations

import copy

from .types import GenerationRequest


def counting_tokenizers(pipeline) -> dict:
    """Private copies of the pipeline's tokenizers. A fast tokenizer keeps its truncation and
    padding settings in shared state that every call rewrites, so counting tokens on the request
    thread with the pipeline's own objects would race with the worker's prompt encoding."""
    return {name: copy.deepcopy(tok) for name in ("tokenizer", "tokenizer_2") if (tok := getattr(pipeline, name, None))}


def prompt_warnings(tokenizers: dict, request: GenerationRequest) -> list[str]:
    """One warning per prompt field that the tokenizer will truncate."""
    checks = [("prompt", request.prompt, "tokenizer"), ("negative_prompt", request.negative_prompt, "tokenizer"),
              ("prompt_2", request.prompt_2, "tokenizer_2"), ("negative_prompt_2", request.negative_prompt_2, "tokenizer_2")]
    warnings = []
    for field, text, tokenizer_name in checks:
        tokenizer = tokenizers.get(tokenizer_name) or tokenizers.get("tokenizer_2")
        if not text or tokenizer is None:
            continue
        count = len(tokenizer(text, truncation=False, verbose=False).input_ids)
        limit = tokenizer.model_max_length
        if count > limit:
            warnings.append(
                f"{field}: {count} tokens; the text encoder reads the first {limit} (start and end "
                f"markers included), the rest was ignored"
            )
    return warnings
