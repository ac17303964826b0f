"""``sdserve train`` on bad input: a usage error (exit status 2) that names the problem, with no
traceback and no output, in process and from the command line; and without the training extra the
command line says how to install it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.training import NAME, PROMPT, write_images
from sdserve.training import main as train_main


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

    import sdserve.cli.commands as cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--help"])
    assert stop.value.code == 2
    assert 'sdserve train needs the training extra: pip install "sdserve[train]"' in capsys.readouterr().err
