"""``sdserve train``: DreamBooth LoRA fine-tuning of tiny random-weight models on a CPU, written
where servers read adapters. The loss falls on a toy set; the adapter folder holds what servers
read, and the adapter loads in a running server and changes its images; two Ray Train workers write
the same format. Resuming, class images and S3 are in test_training_runs.py, bad input in
test_training_errors.py."""

from __future__ import annotations

import base64
import glob
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers.training import CAPTION, FAST, NAME, PROMPT, WEIGHTS, train
from sdserve.request.recipes import read_recipe


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> dict[str, Path]:
    """120 steps on three images with the default settings (gradient checkpointing, cached
    embeddings), a learning rate high enough for a random tiny UNet (attention only at its 2x2
    bottleneck) to learn something in so few steps, and a validation image at the end."""
    root = tmp_path_factory.mktemp("trained")
    output, work = root / "loras", root / "work"
    train(tiny["sdxl"], tiny["images"], output, work, "--resolution", "64", "--rank", "8", "--learning_rate", "1e-2",
          "--max_train_steps", "120", "--checkpointing_steps", "60", "--validation_steps", "120",
          "--validation_inference_steps", "3")
    return {"output": output, "work": work, "adapter": output / NAME, "model": tiny["sdxl"]}


def probe_loss(model: Path, work: Path, adapter: Path | None) -> float:
    """The denoising loss of the cached training latents under fixed noise and timesteps (not the
    ones training drew), with or without the trained adapter loaded as servers load it."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    (cache,) = glob.glob(str(work / "cache" / "*.safetensors"))
    data = load_file(cache)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter), weight_name=WEIGHTS, adapter_name="trained")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(1234)
    repeat = 16
    latents = (data["latent_mean"] * pipe.vae.config.scaling_factor).repeat(repeat, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    rows = data["prompt_index"].repeat(repeat)
    with torch.no_grad():
        prediction = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps,
                               encoder_hidden_states=data["embeds"][rows],
                               added_cond_kwargs={"text_embeds": data["pooled"][rows],
                                                  "time_ids": data["time_ids"].repeat(repeat, 1)}).sample
    return torch.nn.functional.mse_loss(prediction, noise).item()


def test_the_loss_is_finite_and_falls_on_a_toy_set(trained):
    losses = [json.loads(line)["loss"] for line in (trained["work"] / "train-log.jsonl").read_text().splitlines()]
    assert len(losses) == 120 and all(np.isfinite(losses))
    before = probe_loss(trained["model"], trained["work"], None)
    after = probe_loss(trained["model"], trained["work"], trained["adapter"])
    # a tiny random UNet can only learn so much through its attention: 1.2-1.9 % over seeds
    assert after < before * 0.995, (before, after)


def test_the_adapter_folder_holds_exactly_what_servers_read(trained):
    assert sorted(p.name for p in trained["output"].iterdir()) == [NAME]
    assert sorted(p.name for p in trained["adapter"].iterdir()) == ["pytorch_lora_weights.safetensors", "sdserve.json"]
    recipe = read_recipe(trained["adapter"])  # as servers validate it
    assert recipe.info["instance_prompt"] == PROMPT and "DreamBooth LoRA" in recipe.info["description"]
    assert recipe.scale == 1.0 and recipe.fields["num_inference_steps"] == 30 and recipe.fields["width"] == 64
    with safe_open(trained["adapter"] / WEIGHTS, "pt") as weights:
        keys = list(weights.keys())
        config = json.loads(weights.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") for k in keys)
    assert config["unet.r"] == 8 and config["unet.lora_alpha"] == 8  # the scale servers load it with
    # the caption file replaced the instance prompt for its image; the rest of the work folder
    (cache,) = glob.glob(str(trained["work"] / "cache" / "*.safetensors"))
    with safe_open(cache, "pt") as data:
        assert sorted(json.loads(data.metadata()["prompts"])) == sorted([PROMPT, CAPTION])
    assert (trained["work"] / "validation" / "step-000120.png").is_file()
    assert [p.name for p in sorted((trained["work"] / "checkpoints").iterdir())] == ["checkpoint-000060",
                                                                                      "checkpoint-000120"]


def _image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["image"]["b64"]))))


def test_a_running_server_serves_the_adapters_and_lists_their_recipes(trained, tiny, tmp_path, start_server):
    """The 120-step adapter, and one trained on the text encoders too, in one --lora_dir."""
    loras = tmp_path / "loras"
    shutil.copytree(trained["adapter"], loras / NAME)
    train(tiny["sdxl"], tiny["images"], tmp_path / "te", tmp_path / "work-te", *FAST, "--max_train_steps", "2",
          "--train_text_encoder", "--learning_rate", "1e-2")
    shutil.copytree(tmp_path / "te" / NAME, loras / "with-text")
    assert {k.split(".")[0] for k in load_file(loras / "with-text" / WEIGHTS)} == {"unet", "text_encoder",
                                                                                  "text_encoder_2"}
    server = start_server("--model_dir", str(trained["model"]), "--lora_dir", str(loras), model_name="trained")
    listed = httpx.get(f"{server.url}/v1/models/trained").json()
    assert listed["adapters"] == ["with-text", NAME]
    assert listed["recipes"][NAME]["instance_prompt"] == PROMPT and listed["recipes"][NAME]["scale"] == 1.0
    request = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 4, "width": 64, "height": 64}
    plain = _image(server.predict({"instances": [request]}))
    for name in (NAME, "with-text"):
        with_lora = _image(server.predict({"instances": [{**request, "loras": [name]}]}))
        assert plain.shape == with_lora.shape == (64, 64, 3)
        assert np.abs(plain.astype(int) - with_lora.astype(int)).max() > 0, name
    # the recipe fills what a request leaves out
    answer = server.predict({"instances": [{"prompt": PROMPT, "loras": [NAME], "num_inference_steps": 3}]})
    assert answer.json()["predictions"][0]["parameters"]["width"] == 64


@pytest.mark.slow
def test_two_ray_train_workers_write_the_same_format(trained, tiny, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is part of the train extra")
    ray.init(num_cpus=2, include_dashboard=False)  # a worker per CPU
    try:
        train(tiny["sdxl"], tiny["images"], tmp_path / "out", tmp_path / "work", *FAST, "--rank", "8",
              "--max_train_steps", "2", "--ray_workers", "2", "--validation_steps", "1", "--validation_inference_steps",
              "2", "--checkpointing_steps", "2")
    finally:
        ray.shutdown()
    adapter = tmp_path / "out" / NAME
    assert sorted(p.name for p in adapter.iterdir()) == ["pytorch_lora_weights.safetensors", "sdserve.json"]
    distributed, single = load_file(adapter / WEIGHTS), load_file(trained["adapter"] / WEIGHTS)
    assert distributed.keys() == single.keys()
    assert all(distributed[k].shape == single[k].shape for k in single)
    read_recipe(adapter)
    # rank 0 alone made the cache and validation images; both processes' RNG states are checkpointed
    work = tmp_path / "work"
    assert len(list((work / "cache").glob("*.safetensors"))) == 1
    assert sorted(p.name for p in (work / "validation").iterdir()) == ["step-000001.png", "step-000002.png"]
    checkpoint = work / "checkpoints" / "checkpoint-000002"
    assert {p.name for p in checkpoint.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
