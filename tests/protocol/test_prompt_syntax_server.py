"""Prompt syntax over the wire: prompt_syntax on v1, v2 and OpenAI requests, the tokens each text
encoder read in the response, the truncation warning of plain prompts, textual-inversion embeddings
in the model metadata, and 400s that name the field and the position; the server keeps serving."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import save_file

from helpers.images import decode_png

SMALL = {"num_inference_steps": 3, "width": 64, "height": 64, "seed": 4}
LONG = ", ".join(f"detail {i}" for i in range(15))  # 77 < tokens < 200 (the tiny tokenizer splits words)


@pytest.fixture(scope="module")
def server(models, start_server, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("syntax") / "model"
    shutil.copytree(models["sdxl"], folder)
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    (folder / "embeddings").mkdir()
    dims = {"clip_l": pipeline.text_encoder.config.hidden_size, "clip_g": pipeline.text_encoder_2.config.hidden_size}
    save_file({part: torch.randn(2, dim) for part, dim in dims.items()}, str(folder / "embeddings" / "sks.safetensors"))
    return start_server("--model_dir", str(folder), "--max_prompt_tokens", "200", model_name="syntax")


def predict(server, **values) -> httpx.Response:
    return server.predict({"instances": [{**SMALL, **values}]})


def test_weighted_prompts_say_what_each_encoder_read(server):
    answer = predict(server, prompt="a (red hat:1.3), <sks>", prompt_syntax="a1111")
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["predictions"][0]
    assert prediction["parameters"]["prompt_syntax"] == "a1111"
    tokens = prediction["prompt_tokens"]
    assert set(tokens) == {"text_encoder", "text_encoder_2"} and 2 < tokens["text_encoder"] <= 77
    long = predict(server, prompt=f"a lighthouse, {LONG}", prompt_syntax="compel").json()["predictions"][0]
    assert long["prompt_tokens"]["text_encoder"] > 77 and "warnings" not in long  # read whole, in chunks
    plain = predict(server, prompt=f"a lighthouse, {LONG}").json()["predictions"][0]
    assert plain["prompt_tokens"] == {"text_encoder": 77, "text_encoder_2": 77}
    assert "the rest was ignored" in plain["warnings"][0] and "prompt_syntax" in plain["warnings"][0]


def test_the_metadata_lists_the_embeddings(server):
    metadata = httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=30).json()
    assert metadata["embeddings"] == ["sks"] and "prompt_syntax" not in metadata  # the default, plain


@pytest.mark.parametrize("values, words", [
    ({"prompt": "a (red hat", "prompt_syntax": "a1111"}, "instances[0].prompt: at position 2: '(' is never closed"),
    ({"prompt": "a cat", "negative_prompt": "(x:9)", "prompt_syntax": "a1111"},
     "instances[0].negative_prompt: at position 0: weight 9 is out of range: weights go from 0 to 3"),
    ({"prompt": "a <nope> cat", "prompt_syntax": "compel"},
     "instances[0].prompt: at position 2: no textual-inversion embedding named 'nope'; available: sks"),
    ({"prompt": LONG * 3, "prompt_syntax": "compel"}, "at most 200 (--max_prompt_tokens)"),
    ({"prompt": "a cat", "prompt_syntax": "latex"}, "prompt_syntax"),
])
def test_bad_prompts_are_a_400_naming_the_field_and_the_position(server, values, words):
    answer = predict(server, **values)
    assert answer.status_code == 400 and words in answer.json()["error"], answer.text
    assert predict(server, prompt="a cat").status_code == 200  # and the server goes on


def test_v2_and_openai_take_prompt_syntax(server):
    body = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a (red hat:1.2)"]}],
            "parameters": {**SMALL, "prompt_syntax": "a1111"}}
    answer = server.infer(body)
    assert answer.status_code == 200, answer.text
    parameters = answer.json()["parameters"]
    assert json.loads(parameters["prompt_tokens"])[0]["text_encoder"] > 2
    openai = httpx.post(f"{server.url}/openai/v1/images/generations", timeout=120, json={
        "model": server.model_name, "prompt": "a (red hat)1.2", "size": "64x64", "response_format": "b64_json",
        "prompt_syntax": "compel", "num_inference_steps": 3, "seed": 4})
    assert openai.status_code == 200, openai.text
    assert decode_png(openai.json()["data"][0]["b64_json"]).shape == (64, 64, 3)
    assert openai.json()["prompt_tokens"]["text_encoder_2"] > 2
