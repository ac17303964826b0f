"""``sdserve train`` in process, as the training tests run it: one run with the tests' adapter name
and instance prompt, fast settings for tiny models, and a folder of training pictures."""

from __future__ import annotations

from pathlib import Path

from sdserve.training import main as train_main

from .images import make_image

NAME = "zwx-pattern"
PROMPT = "a photo of zwx pattern"
CAPTION = "a photo of zwx pattern, in blue"
WEIGHTS = "pytorch_lora_weights.safetensors"
FAST = ["--resolution", "64", "--rank", "4", "--validation_steps", "0", "--checkpointing_steps", "0",
        "--no_gradient_checkpointing"]


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
