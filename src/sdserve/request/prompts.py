"""What the text encoders will actually read of a prompt, said in the response.

CLIP encoders read 77 tokens (start and end markers included). A ``plain`` prompt is read as
diffusers reads it: the rest is dropped, and sdserve generates anyway and says so, so a client
learns why the end of a long prompt had no effect. A weighted prompt (``compel``, ``a1111``) is
read whole, in chunks of 75 tokens between the markers, up to ``--max_prompt_tokens`` (a 400
beyond). Counting runs on the request thread, with private copies of the tokenizers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from compel.prompt_parser import PromptParser
from kserve.errors import InvalidInput

from .prompt_syntax import to_compel
from .types import GenerationRequest

ENCODERS = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2"}
CHUNK = 75  # tokens of text in one 77-token chunk


@dataclass
class PromptReport:
    warnings: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # text encoder -> tokens of the prompt it read


def counting_tokenizers(tokenizers: dict) -> dict:
    """Private copies of ``tokenizers`` (name -> tokenizer, None entries skipped). A fast tokenizer
    keeps its truncation and padding settings in shared state that every call rewrites, so counting
    on the request thread with the worker's own objects would race with its prompt encoding."""
    return {name: copy.deepcopy(tok) for name, tok in tokenizers.items() if tok is not None and name in ENCODERS}


def _weighted_tokens(tokenizer, compel_text: str) -> int:
    """Tokens a weighted prompt is read as: each ``.and()`` part in chunks of 75 plus the markers."""
    total = 0
    for part in PromptParser().parse_conjunction(compel_text).prompts:
        text = " ".join(getattr(fragment, "text", "") for fragment in getattr(part, "children", []))
        count = len(tokenizer(text, truncation=False, verbose=False).input_ids) - 2  # without the markers
        total += max(1, -(-count // CHUNK)) * 2 + count
    return total


def prompt_report(plain: dict, weighted: dict, request: GenerationRequest, max_tokens: int,
                  embeddings=frozenset()) -> PromptReport:
    """Warnings for what a plain prompt loses, and the tokens each encoder reads of the prompt;
    raises InvalidInput when a weighted prompt is longer than ``max_tokens``. ``plain`` and
    ``weighted`` are counting tokenizers (the weighted ones know the embeddings' tokens)."""
    report = PromptReport()
    fields = [("prompt", request.prompt, "tokenizer"), ("negative_prompt", request.negative_prompt, "tokenizer"),
              ("prompt_2", request.prompt_2, "tokenizer_2"), ("negative_prompt_2", request.negative_prompt_2, "tokenizer_2")]
    tokenizers = plain if request.prompt_syntax == "plain" else weighted
    for name, text, tokenizer_name in fields:
        tokenizer = tokenizers.get(tokenizer_name) or tokenizers.get("tokenizer_2")
        if not text or tokenizer is None:
            continue
        if request.prompt_syntax == "plain":
            count = len(tokenizer(text, truncation=False, verbose=False).input_ids)
            limit = tokenizer.model_max_length
            if count > limit:
                report.warnings.append(
                    f"{name}: {count} tokens; the text encoder reads the first {limit} (start and end markers "
                    f"included), the rest was ignored (prompt_syntax compel or a1111 reads long prompts whole)")
            read = min(count, limit)
        else:
            read = _weighted_tokens(tokenizer, to_compel(text, request.prompt_syntax, embeddings))
            if read > max_tokens:
                raise InvalidInput(f"{name}: {read} tokens ({ENCODERS[tokenizer_name]}, markers included); the server "
                                   f"reads at most {max_tokens} (--max_prompt_tokens)")
        if name == "prompt":
            report.tokens.update({ENCODERS[t]: read for t in tokenizers if request.prompt_2 is None or t == "tokenizer"})
        elif name == "prompt_2":
            report.tokens["text_encoder_2"] = read
    return report
