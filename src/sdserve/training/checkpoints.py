"""Checkpoints in ``<work_dir>/checkpoints/checkpoint-<step>``: accelerate's state (optimizer, LR
scheduler, each process's RNG) plus the LoRA layers alone (the frozen weights are not copied), and
the settings they were made with, so ``--resume`` can refuse a run that would not fit them.

A checkpoint counts once its ``complete`` marker is written: a run killed while saving leaves one
that ``--resume`` skips.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from .options import InputError

log = logging.getLogger("sdserve")

MARKER = "complete"
LOSS_LOG = "train-log.jsonl"  # one JSON line per step: step, loss, lr, seconds
STATE = "sdserve-state.json"
# Settings a checkpoint's state depends on; the others (steps, learning rate ...) may change on resume.
MUST_MATCH = ("rank", "alpha", "train_text_encoder", "resolution", "model", "use_8bit_adam")


def folder(work: Path, step: int) -> Path:
    return work / "checkpoints" / f"checkpoint-{step:06d}"


def _step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete(work: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = work / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step(p) >= 0 and (p / MARKER).is_file()]
    return sorted(found, key=_step)


def latest(work: Path) -> Path | None:
    done = complete(work)
    return done[-1] if done else None


def mark(path: Path, step: int, settings: dict) -> None:
    (path / STATE).write_text(json.dumps({"step": step, "settings": settings}, indent=1))
    (path / MARKER).touch()


def read(path: Path, settings: dict) -> int:
    """The step ``path`` was saved at; InputError if it was made with other settings."""
    state = json.loads((path / STATE).read_text())
    saved = state.get("settings", {})
    for key in MUST_MATCH:
        if key in saved and saved[key] != settings.get(key):
            raise InputError(f"--resume: {path} was made with {key} = {saved[key]!r}, this run has "
                             f"{settings.get(key)!r}; use the same setting or another --work_dir")
    return int(state["step"])


def start(work: Path, step: int) -> None:
    """Forget what lies beyond ``step``: a run from step 0 (no --resume) removes an earlier run's
    checkpoints, so that a later --resume cannot pick them up; the loss log keeps steps up to ``step``."""
    if step == 0 and (work / "checkpoints").is_dir():
        log.warning("starting over: removing the checkpoints of an earlier run in %s (--resume continues one)",
                    work / "checkpoints")
        shutil.rmtree(work / "checkpoints")
    history = work / LOSS_LOG
    if history.is_file():
        kept = [line for line in history.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        history.write_text("".join(line + "\n" for line in kept))


def register_hooks(accelerator, modules: Callable[[], dict]) -> None:
    """Make accelerate's save_state/load_state keep the LoRA layers of ``modules()`` (name -> the
    unwrapped module) instead of whole models: the frozen weights are not copied into checkpoints."""
    from . import lora

    def save(models, weights, folder):
        if accelerator.is_main_process:
            lora.save_checkpoint(modules(), Path(folder))
        weights.clear()

    def load(models, folder):
        lora.load_checkpoint(modules(), Path(folder))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def prune(work: Path, keep: int) -> None:
    for old in complete(work)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in (work / "checkpoints").iterdir():  # left by a run killed while saving
        if partial.is_dir() and not (partial / MARKER).is_file():
            shutil.rmtree(partial, ignore_errors=True)
