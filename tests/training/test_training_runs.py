"""``sdserve train`` runs beyond the first: --resume continues a run exactly (and refuses a
checkpoint made with other LoRA settings), prior preservation makes its class images with sdserve's
engine and reuses them, and an S3 output (with the pictures in the bucket too) gets the adapter
under its prefix."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers.servers import free_port
from helpers.training import FAST, NAME, PROMPT, WEIGHTS, train

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


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
