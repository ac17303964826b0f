"""Prompts as users write them: ``prompt_syntax`` ``plain`` (the text as diffusers reads it, 77
tokens), ``compel`` (compel's weighting syntax: ``(red hat)1.3``, ``cat+``, ``("a", "b").and()``)
or ``a1111`` (AUTOMATIC1111's: ``(red hat:1.3)``, ``(cat)`` x1.1, ``[blurry]`` /1.1, ``BREAK``).

compel builds the embeddings of both weighted syntaxes (``generation/weighted_prompts.py``); what it
lacks is written here: AUTOMATIC1111's syntax is parsed and rewritten into compel's (``BREAK``
becomes compel's ``.and()``, which encodes each part in chunks of its own and concatenates them, as
AUTOMATIC1111 starts a new 75-token chunk), and both syntaxes are checked so that a mistake is a
400 naming the field and the position rather than a silently different image: unbalanced
brackets, a weight out of range, an unknown textual-inversion embedding. Embeddings are named
``<name>`` or ``embedding:name`` (the file name without ``.safetensors``); the bare name works too.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

from kserve.errors import InvalidInput

SYNTAXES = ("plain", "compel", "a1111")
CLIP_PROMPTS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")  # what the syntax applies to
MAX_WEIGHT = 3.0
UP = 1.1  # AUTOMATIC1111's (text) and compel's text+

_REFERENCE = re.compile(r"<([A-Za-z0-9][A-Za-z0-9._-]{0,63})>|embedding:([A-Za-z0-9][A-Za-z0-9._-]{0,63})")
_EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):[^>]*>")
_A1111_WEIGHT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
_COMPEL_WEIGHT = re.compile(r"\)\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))")
_BREAK = re.compile(r"\bBREAK\b")


@dataclass(frozen=True)
class PromptSettings:
    """The server's side of prompt syntax: the default (--prompt_syntax) and the textual-inversion
    embeddings prompts may name (--embeddings_dir)."""

    default_syntax: str = "plain"
    embeddings: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.default_syntax not in SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {self.default_syntax!r}")


class PromptSyntaxError(ValueError):
    """What is wrong with a prompt, and where (0-based character position)."""

    def __init__(self, position: int, message: str):
        super().__init__(f"at position {position}: {message}")
        self.position = position


def to_compel(text: str, syntax: str, embeddings: Collection[str] = ()) -> str:
    """``text`` in compel's syntax, embedding references replaced by their tokens; raises
    PromptSyntaxError. ``plain`` text is not for compel: it comes back as it is."""
    if syntax == "plain":
        return text
    text = _embedding_references(text, embeddings)
    if syntax == "compel":
        _check_compel(text)
        return _canonical_compel(text)
    return _a1111_to_compel(text)


def _canonical_compel(text: str) -> str:
    """compel text with its weights written out and weights of 1 as plain text: compel reads the
    pooled embedding (SDXL) from the text as written, so ``(red hat)1.0`` must read as ``red hat``
    for weights of 1 to give the plain image. Blends and swaps stay as written."""
    from compel.prompt_parser import FlattenedPrompt, PromptParser

    conjunction = PromptParser().parse_conjunction(text)
    if any(type(p) is not FlattenedPrompt for p in conjunction.prompts) or any(w != 1 for w in conjunction.weights):
        return text
    chunks = [_compel_chunk([(f.text, f.weight) for f in p.children]) for p in conjunction.prompts]
    return _joined(chunks)


def check_prompts(prompts: dict[str, str | None], syntax: str, embeddings: Collection[str]) -> None:
    """Raise InvalidInput naming the field (``prompts``' keys) and the position of the first mistake."""
    for label, text in prompts.items():
        if text:
            try:
                to_compel(text, syntax, embeddings)
            except PromptSyntaxError as exc:
                raise InvalidInput(f"{label}: {exc} (prompt_syntax {syntax})") from None


def _embedding_references(text: str, embeddings: Collection[str]) -> str:
    if found := _EXTRA_NETWORK.search(text):
        raise PromptSyntaxError(found.start(), f"{found.group(0)!r:.80}: LoRA adapters go in the loras field, "
                                "not in the prompt")

    def token(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in embeddings:
            available = ", ".join(sorted(embeddings)[:20]) or "none"
            raise PromptSyntaxError(match.start(),
                                    f"no textual-inversion embedding named {name!r}; available: {available}")
        return name

    return _REFERENCE.sub(token, text)


def _check_weight(weight: float, position: int) -> None:
    if not 0.0 <= weight <= MAX_WEIGHT:
        raise PromptSyntaxError(position, f"weight {weight:g} is out of range: weights go from 0 to {MAX_WEIGHT:g}")


def _check_compel(text: str) -> None:
    """Balanced brackets and quotes, weights in range: compel itself would read a stray bracket as
    text and any number as a weight."""
    opened: list[int] = []
    quoted: int | None = None
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = i if quoted is None else None
        elif char == "(":
            opened.append(i)
        elif char == ")":
            if not opened:
                raise PromptSyntaxError(i, "')' closes no '('")
            start = opened.pop()
            if weight := _COMPEL_WEIGHT.match(text, i):
                _check_weight(float(weight.group(1)), start)
        i += 1
    if opened:
        raise PromptSyntaxError(opened[-1], "'(' is never closed")
    if quoted is not None:
        raise PromptSyntaxError(quoted, "'\"' is never closed")
    for run in re.finditer(r"(\+{2,}|-{2,})(?=\s|$|[,.;)])", text):
        if UP ** len(run.group(1)) > MAX_WEIGHT:
            raise PromptSyntaxError(run.start(), f"{run.group(1)} weighs more than {MAX_WEIGHT:g}")


def _a1111_fragments(text: str) -> list[list[tuple[str, float]]]:
    """AUTOMATIC1111's attention syntax as chunks (split at BREAK) of (text, weight) fragments: a
    bracket multiplies the weights of the text inside it when it closes, by 1.1 for ``(...)``, by
    the number for ``(...:number)`` and by 1/1.1 for ``[...]``."""
    chunks: list[list[list]] = [[]]  # fragments as [text, weight, position]
    opened: list[tuple[str, int, int]] = []  # (bracket, its position, index of its first fragment in the chunk)
    buffer, buffer_at = "", 0
    i = 0

    def flush() -> None:
        nonlocal buffer
        if buffer:
            chunks[-1].append([buffer, 1.0, buffer_at])
            buffer = ""

    def close(factor: float) -> None:
        _, _, first = opened.pop()
        for fragment in chunks[-1][first:]:
            fragment[1] *= factor

    while i < len(text):
        char = text[i]
        if not buffer:
            buffer_at = i
        if char == "\\" and i + 1 < len(text):
            buffer += text[i + 1]
            i += 2
            continue
        if not opened and _BREAK.match(text, i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            flush()
            chunks.append([])
            i += len("BREAK")
            continue
        explicit = _A1111_WEIGHT.match(text, i) if char == ":" and opened and opened[-1][0] == "(" else None
        if char in "([":
            flush()
            opened.append((char, i, len(chunks[-1])))
        elif explicit:
            flush()
            weight = float(explicit.group(1))
            _check_weight(weight, opened[-1][1])
            close(weight)
            i = explicit.end()
            continue
        elif char in ")]":
            wanted = "(" if char == ")" else "["
            if not opened or opened[-1][0] != wanted:
                raise PromptSyntaxError(i, f"'{char}' closes no '{wanted}'")
            flush()
            close(UP if char == ")" else 1 / UP)
        else:
            buffer += char
        i += 1
    if opened:
        raise PromptSyntaxError(opened[-1][1], f"'{opened[-1][0]}' is never closed")
    flush()
    for chunk in chunks:
        for fragment_text, weight, position in chunk:
            if weight > MAX_WEIGHT:
                raise PromptSyntaxError(position, f"{fragment_text.strip()!r:.40} weighs {weight:.3g} through its "
                                        f"brackets, more than {MAX_WEIGHT:g}")
    return [[(fragment_text, weight) for fragment_text, weight, _ in chunk] for chunk in chunks]


def _escape(text: str) -> str:
    return re.sub(r'([()"\\])', r"\\\1", text)


def _compel_chunk(fragments: list[tuple[str, float]]) -> str:
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    parts = []
    for text, weight in merged:
        if not text.strip():
            parts.append(text)
        elif weight == 1.0:
            parts.append(_escape(text))
        else:
            parts.append(f"({_escape(text.strip())}){round(weight, 4):g}")
    return " ".join(p.strip() for p in parts if p.strip())


def _a1111_to_compel(text: str) -> str:
    return _joined([_compel_chunk(fragments) for fragments in _a1111_fragments(text)])


def _joined(chunks: list[str]) -> str:
    """One chunk as it is; several as compel's ``.and()`` of quoted parts."""
    chunks = [c for c in chunks if c] or [""]
    if len(chunks) == 1:
        return chunks[0]
    quoted = ", ".join('"' + chunk.replace('"', '\\"') + '"' for chunk in chunks)
    return f"({quoted}).and()"
