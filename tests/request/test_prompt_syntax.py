"""Prompt syntaxes alone: AUTOMATIC1111's attention syntax becomes compel's with the same weights
(compel's own parser reads the result), and mistakes are found with their position."""

from __future__ import annotations

import pytest
from compel.prompt_parser import PromptParser

from sdserve.request.prompt_syntax import PromptSyntaxError, to_compel


def fragments(compel_text: str) -> list[list[tuple[str, float]]]:
    """What compel reads: per .and() part, (text, weight) fragments."""
    return [[(f.text, round(f.weight, 4)) for f in part.children]
            for part in PromptParser().parse_conjunction(compel_text).prompts]


@pytest.mark.parametrize("a1111, compel", [
    ("a (red hat:1.3) on a cat", "a (red hat)1.3 on a cat"),
    ("a (red hat) on a cat", "a (red hat)1.1 on a cat"),
    ("((cat))", "((cat)1.1)1.1"),
    ("[blurry] photo", "(blurry)0.9091 photo"),
    ("(cat:0.5) [(dog:1.2)]", "(cat)0.5 (dog)1.0909"),
    ("one BREAK two (three:0.5)", '("one", "two (three)0.5").and()'),
    (r"a \(literal\) bracket", r"a \(literal\) bracket"),
    ("x BREAKFAST", "x BREAKFAST"),
])
def test_a1111_weights_read_as_compel_reads_its_own(a1111, compel):
    assert fragments(to_compel(a1111, "a1111")) == fragments(compel)


def test_plain_text_is_left_alone():
    assert to_compel("a (red hat:1.3) <emb>", "plain", {"emb"}) == "a (red hat:1.3) <emb>"


def test_embeddings_are_named_by_their_file_name():
    assert to_compel("a <sks> and embedding:sks, sks", "compel", {"sks"}) == "a sks and sks, sks"
    assert fragments(to_compel("(<sks>:1.2) cat", "a1111", {"sks"})) == [[("sks", 1.2), ("cat", 1.0)]]


@pytest.mark.parametrize("syntax, text, position, words", [
    ("a1111", "a (red hat", 2, "'(' is never closed"),
    ("a1111", "a red) hat", 5, "')' closes no '('"),
    ("a1111", "a [red hat)", 10, "')' closes no '('"),
    ("a1111", "a (cat:5) here", 2, "weight 5 is out of range: weights go from 0 to 3"),
    ("a1111", "((((((((((((x))))))))))))", 12, "weighs 3.14 through its brackets, more than 3"),
    ("a1111", "a <nope> cat", 2, "no textual-inversion embedding named 'nope'; available: sks"),
    ("a1111", "a <lora:style:0.8> cat", 2, "LoRA adapters go in the loras field"),
    ("compel", "a (cat", 2, "'(' is never closed"),
    ("compel", "a cat)", 5, "')' closes no '('"),
    ("compel", "(cat)9", 0, "weight 9 is out of range"),
    ("compel", 'say "x', 4, "'\"' is never closed"),
    ("compel", "embedding:nope", 0, "no textual-inversion embedding named 'nope'"),
])
def test_mistakes_are_found_with_their_position(syntax, text, position, words):
    with pytest.raises(PromptSyntaxError) as error:
        to_compel(text, syntax, {"sks"})
    assert error.value.position == position and words in str(error.value)


def test_the_server_default_applies_where_the_request_says_nothing():
    from kserve.errors import InvalidInput

    from helpers.capabilities import SD3, SDXL
    from sdserve.request.prompt_syntax import PromptSettings
    from sdserve.request.types import Limits
    from sdserve.request.validation import RequestParser

    parser = RequestParser(Limits(), SDXL, prompts=PromptSettings("a1111", frozenset({"sks"})))
    assert parser.parse({"prompt": "a (cat:1.2)"}).prompt_syntax == "a1111"
    assert parser.parse({"prompt": "a (cat", "prompt_syntax": "plain"}).prompt_syntax == "plain"  # plain: as it is
    with pytest.raises(InvalidInput, match=r"^prompt: at position 2: '\(' is never closed \(prompt_syntax a1111\)"):
        parser.parse({"prompt": "a (cat"})
    with pytest.raises(InvalidInput, match=r"^negative_prompt_2: at position 0: no textual-inversion embedding"):
        parser.parse({"prompt": "a cat", "negative_prompt_2": "<nope>", "prompt_syntax": "compel"})
    # SD3: the default does not apply, and asking for it says what SD3 does instead
    sd3 = RequestParser(Limits(), SD3, prompts=PromptSettings("a1111"))
    assert sd3.parse({"prompt": "a (cat:1.2)"}).prompt_syntax == "plain"
    with pytest.raises(InvalidInput, match="prompt_syntax: only SD 1.x/2.x and SDXL models .* T5 encoder: up to 256"):
        sd3.parse({"prompt": "a cat", "prompt_syntax": "compel"})
