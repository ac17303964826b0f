"""``sdserve train``: DreamBooth LoRA fine-tuning of tiny random-weight models on a CPU, written
where servers read adapters. The loss falls on a toy set; the adapter loads in a running server
and changes its images; --resume continues a run exactly; class images come from sdserve's engine
and are reused; two Ray Train workers and an S3 output write the same format; bad input is a usage
error (exit status 2) naming the problem."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
import torch
from conftest import free_port, make_image
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdserve.request.recipes import read_recipe
from sdserve.tiny import write_tiny_model
from sdserve.training import main as train_main

NAME = "zwx-pattern"
PROMPT = "a photo of zwx pattern"
CAPTION = "a photo of zwx pattern, in blue"
WEIGHTS = "pytorch_lora_weights.safetensors"
FAST = ["--resolution", "64", "--rank", "4", "--validation_steps", "0", "--checkpointing_steps", "0",
        "--no_gradient_checkpointing"]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def train(model: Path, images, output, work: Path, *flags: str) -> None:
    """One in-process ``sdserve train`` run (accelerate keeps its state per process: reset it)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train_main(["--model_dir", str(model), "--images", str(images), "--instance_prompt", PROMPT, "--name", NAME,
                "--output", str(output), "--work_dir", str(work), *flags])


def write_images(folder: Path, count: int = 3) -> Path:
    """``count`` smooth pictures, not square (they are cropped); the second has its own caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        make_image(96, 80, seed=i).save(folder / f"photo-{i}.png")
    (folder / "photo-1.txt").write_text(CAPTION + "\n")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and do not crawl when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-models")
    return {"sdxl": write_tiny_model(root / "sdxl", "sdxl"), "sd": write_tiny_model(root / "sd", "sd"),
            "images": write_images(root / "images")}


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


def test_resume_continues_from_the_latest_checkpoint_as_if_never_stopped(tiny, tmp_path):
    flags = [*FAST[:-3], "--checkpointing_steps", "2", "--no_gradient_checkpointing"]
    train(tiny["sdxl"], tiny["images"], tmp_path / "whole", tmp_path / "w-whole", *flags, "--max_train_steps", "6")
    train(tiny["sdxl"], tiny["images"], tmp_path / "parts", tmp_path / "w-parts", *flags, "--max_train_steps", "4")
    assert [p.name for p in sorted((tmp_path / "w-parts" / "checkpoints").iterdir())] == ["checkpoint-000002",
                                                                                           "checkpoint-000004"]
    train(tiny["sdxl"], tiny["images"], tmp_path / "parts", tmp_path / "w-parts", *flags, "--max_train_steps", "6",
          "--resume")

    def log(work: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / work / "train-log.jsonl").read_text().splitlines()]

    assert [r["step"] for r in log("w-parts")] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log("w-parts")] == pytest.approx([r["loss"] for r in log("w-whole")], rel=1e-5)
    whole = load_file(tmp_path / "whole" / NAME / WEIGHTS)
    parts = load_file(tmp_path / "parts" / NAME / WEIGHTS)
    assert whole.keys() == parts.keys()
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], rtol=1e-5, atol=1e-6)
    # the optimizer state went on counting from the checkpoint
    optimizer = torch.load(tmp_path / "w-parts" / "checkpoints" / "checkpoint-000006" / "optimizer.bin",
                           weights_only=True)
    assert {float(state["step"]) for state in optimizer["state"].values()} == {6.0}


def test_resume_refuses_a_checkpoint_made_with_other_lora_settings(tiny, tmp_path, capsys):
    train(tiny["sdxl"], tiny["images"], tmp_path / "out", tmp_path / "work", *FAST[:-3], "--checkpointing_steps", "1",
          "--max_train_steps", "1")
    with pytest.raises(SystemExit) as stop:
        train(tiny["sdxl"], tiny["images"], tmp_path / "out", tmp_path / "work", *FAST, "--rank", "8", "--resume",
              "--max_train_steps", "2")
    assert stop.value.code == 2
    assert "--resume:" in capsys.readouterr().err


def test_prior_preservation_makes_class_images_with_the_engine_and_reuses_them(tiny, tmp_path):
    """SD 2.x-style model; the class images are those `sdserve generate --model_dir` makes."""
    from sdserve.cli.generate import main as generate

    def flags(count: int) -> list[str]:
        return [*FAST, "--max_train_steps", "2", "--class_prompt", "a photo of a pattern", "--num_class_images",
                str(count), "--class_inference_steps", "3"]

    train(tiny["sd"], tiny["images"], tmp_path / "out", tmp_path / "work", *flags(2))
    folder = tmp_path / "work" / "class_images"
    made = sorted(folder.glob("*.png"))
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png"]
    generate(["a photo of a pattern", "--model_dir", str(tiny["sd"]), "--width", "64", "--height", "64",
              "--steps", "3", "--seed", "0", "--num_images", "2", "-o", str(tmp_path / "engine.png"), "--no-progress"])
    for i, path in enumerate(made):
        expected = np.asarray(Image.open(tmp_path / f"engine-{i}.png").convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
    stamps = {p: p.stat().st_mtime_ns for p in made}
    # a rerun reuses them; asking for one more makes only that one
    train(tiny["sd"], tiny["images"], tmp_path / "out", tmp_path / "work", *flags(3))
    assert {p: p.stat().st_mtime_ns for p in made} == stamps
    assert len(list(folder.glob("*.png"))) == 3
    assert all(k.startswith("unet.") for k in load_file(tmp_path / "out" / NAME / WEIGHTS))


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


def test_s3_output_writes_the_adapter_under_the_prefix(tiny, tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {**CREDENTIALS, "AWS_S3_ENDPOINT": endpoint}.items():  # an OpenShift AI data connection
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="team")
        for path in tiny["images"].iterdir():  # the photos may come from the bucket too
            client.upload_file(str(path), "team", f"photos/{path.name}")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        train(tiny["sdxl"], "s3://team/photos/", "s3://team/loras/", tmp_path / "work", *FAST, "--max_train_steps",
              "2", "--alpha", "8")
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="team", Prefix="loras/")["Contents"])
        assert keys == [f"loras/{NAME}/pytorch_lora_weights.safetensors", f"loras/{NAME}/sdserve.json"]
        client.download_file("team", keys[0], str(tmp_path / WEIGHTS))
        with safe_open(tmp_path / WEIGHTS, "pt") as weights:
            config = json.loads(weights.metadata()["lora_adapter_metadata"])
        assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8
        recipe = json.loads(client.get_object(Bucket="team", Key=keys[1])["Body"].read())
        assert recipe["instance_prompt"] == PROMPT
    finally:
        server.stop()


# -- bad input: a usage error naming the problem, exit status 2, no traceback ------------------------
def _empty(tmp_path: Path, model: Path) -> tuple[Path, Path, list[str]]:
    (tmp_path / "empty").mkdir()
    return model, tmp_path / "empty", []


def _unreadable(tmp_path: Path, model: Path) -> tuple[Path, Path, list[str]]:
    folder = write_images(tmp_path / "images", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    return model, folder, []


def _flags(*extra: str):
    return lambda tmp_path, model: (model, write_images(tmp_path / "images"), list(extra))


def _not_sd(tmp_path: Path, model: Path) -> tuple[Path, Path, list[str]]:
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder, write_images(tmp_path / "images"), []


def _not_a_model(tmp_path: Path, model: Path) -> tuple[Path, Path, list[str]]:
    return tmp_path / "images", write_images(tmp_path / "images"), []


BAD = {  # case: (model, images, extra flags), what the message says
    "empty image folder": (_empty, "no images in it"),
    "unreadable image": (_unreadable, "cannot read"),
    "resolution too large": (_flags("--resolution", "4096"),
                             "--resolution 4096: must be a multiple of 8 from 64 to 512 for this model"),
    "resolution not a multiple of 8": (_flags("--resolution", "100"), "--resolution 100: must be a multiple of 8"),
    "not a plain name": (_flags("--name", "../escape"), "--name '../escape': an adapter name is"),
    "not an SD/SDXL model": (_not_sd, "a StableDiffusion3Pipeline model; sdserve train fine-tunes SD 1.x/2.x"),
    "not a model folder": (_not_a_model, "no diffusers model found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_usage_error_naming_the_problem(case, tiny, tmp_path, capsys):
    make, expected = BAD[case]
    model, images, extra = make(tmp_path, tiny["sdxl"])
    argv = ["--model_dir", str(model), "--images", str(images), "--instance_prompt", PROMPT, "--name", NAME,
            "--output", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"), *extra]
    with pytest.raises(SystemExit) as stop:
        train_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err and "Traceback" not in err, err
    if case == "unreadable image":
        assert "broken.png" in err
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_bad_input_with_exit_status_2(tiny, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdserve", "train", "--model_dir", str(tiny["sdxl"]), "--images", str(tiny["images"]),
         "--instance_prompt", PROMPT, "--name", "no spaces", "--output", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "usage: sdserve train" in result.stderr and "--name 'no spaces'" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_the_training_extra_the_cli_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from sdserve.cli import main as cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--help"])
    assert stop.value.code == 2
    assert 'sdserve train needs the training extra: pip install "sdserve[train]"' in capsys.readouterr().err
