"""Weighted and long prompts (prompt_syntax compel and a1111) inside the step loop: each image equals
diffusers' pipeline called with the embeddings compel itself builds for the same prompt (3/255 at
the 99th percentile), textual-inversion embeddings included; weights of 1.0 give the plain image;
plain prompts are untouched by the embeddings; and weighted prompts share denoiser calls with plain
ones of their length."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers.compel_oracle import compel_images
from helpers.oracle import LocalEngine, diff_p99, max_diff

TOLERANCE = 3
COMMON = {"num_inference_steps": 4, "width": 64, "height": 64, "guidance_scale": 5.0, "refiner": "none"}
LONG = ", ".join(f"detail number {i}" for i in range(40))  # well over 77 tokens


def write_embeddings(folder, pipeline, sdxl: bool) -> None:
    """Two tiny embeddings: sks (one vector) and style (three vectors, a multi-vector embedding)."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(7)
    dims = {"clip_l": pipeline.text_encoder.get_input_embeddings().weight.shape[1]}
    if sdxl:
        dims["clip_g"] = pipeline.text_encoder_2.get_input_embeddings().weight.shape[1]
    for name, vectors in (("sks", 1), ("style", 3)):
        tensors = {part: torch.randn(vectors, dim, generator=generator) for part, dim in dims.items()}
        save_file(tensors if sdxl else {name: tensors["clip_l"]}, str(folder / f"{name}.safetensors"))


@pytest.fixture(scope="module", params=["sdxl-refiner", "sd"])
def setup(request, models, tmp_path_factory):
    from diffusers import DiffusionPipeline

    kind = request.param
    folder = tmp_path_factory.mktemp(kind) / "model"
    shutil.copytree(models[kind], folder)
    pipeline = DiffusionPipeline.from_pretrained(folder / "base" if kind == "sdxl-refiner" else folder)
    write_embeddings(folder / "embeddings", pipeline, sdxl=kind != "sd")
    engine = LocalEngine(folder, embeddings_dir=folder / "embeddings")
    yield engine, folder
    engine.close()


def reference(setup, values: dict) -> list[np.ndarray]:
    engine, folder = setup
    return compel_images(folder, engine.model, engine.parse(values), folder / "embeddings", engine.vocabulary.names)


def test_weighted_long_and_break_prompts_equal_diffusers_with_compels_embeddings(setup):
    engine, _ = setup
    requests = [
        {**COMMON, "prompt": "a (red hat:1.3) on a [blurry] cat", "prompt_syntax": "a1111", "seed": 1},
        {**COMMON, "prompt": "a (red hat)1.3 on a cat--", "prompt_syntax": "compel", "negative_prompt": "(dark)1.2",
         "seed": 2},
        {**COMMON, "prompt": f"a lighthouse, {LONG}", "prompt_syntax": "a1111", "seed": 3},
        {**COMMON, "prompt": "a lighthouse BREAK (stormy sea:1.2)", "prompt_syntax": "a1111", "seed": 4},
        {**COMMON, "prompt": "<sks> photo, (style:1.1)", "prompt_syntax": "a1111", "guidance_scale": 1.0, "seed": 5},
        {**COMMON, "prompt": "a plain prompt", "seed": 6},
        {**COMMON, "prompt": "a harbour BREAK (calm sea:0.8)", "prompt_syntax": "a1111", "seed": 7},
    ]
    jobs = engine.submit(*requests)
    results = [job.future.result(120).images for job in jobs]
    for values, (ours,) in zip(requests, results):
        if values.get("prompt_syntax"):
            (theirs,) = reference(setup, values)
            assert diff_p99(ours, theirs) <= TOLERANCE, (values["prompt"][:40], diff_p99(ours, theirs))
    # prompts of one length share every call: 77 tokens (weighted or plain), two BREAK chunks (154),
    # and the long prompt (more chunks) alone
    assert [jobs[i].most_images_per_call for i in (0, 1, 4, 5)] == [4, 4, 4, 4]
    assert jobs[3].most_images_per_call == jobs[6].most_images_per_call == 2 and jobs[2].most_images_per_call == 1


def test_weights_of_one_give_the_plain_image(setup):
    engine, _ = setup
    plain = engine.images({**COMMON, "prompt": "a red hat on a cat", "seed": 9})[0]
    for values in ({"prompt": "a (red hat:1.0) on a cat", "prompt_syntax": "a1111"},
                   {"prompt": "a (red hat)1.0 on a cat", "prompt_syntax": "compel"}):
        assert np.array_equal(engine.images({**COMMON, **values, "seed": 9})[0], plain), values


def test_embeddings_change_weighted_prompts_only(setup):
    engine, folder = setup
    # a plain prompt reads the embedding's name as the word it is: diffusers' image without embeddings
    plain = {**COMMON, "prompt": "sks photo", "seed": 11}
    assert np.array_equal(engine.images(plain)[0], engine.reference(plain)[0])
    named = engine.images({**plain, "prompt": "<sks> photo", "prompt_syntax": "compel"})[0]
    assert max_diff(named, engine.images(plain)[0]) > 2 * TOLERANCE


def test_the_refiner_reads_weighted_prompts_too(setup):
    engine, folder = setup
    if engine.model.refiner is None:
        pytest.skip("SD 1.x/2.x has no refiner")
    values = {**COMMON, "refiner": "ensemble", "prompt": "a (red hat:1.2) on a cat, <sks>", "prompt_syntax": "a1111",
              "num_inference_steps": 6, "seed": 12}
    (ours,) = engine.images(values)
    (theirs,) = reference(setup, values)
    assert diff_p99(ours, theirs) <= TOLERANCE
