"""``sdserve train`` flags, and every check of them that can fail before training starts.

Bad input ends like an argparse error: the usage, one line naming the problem and what is allowed,
exit status 2, no traceback. Checks that need the model (its family and native size) read only its
configuration files, so they cost nothing before a long run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..adapters.library import NAME
from ..models.layout import ModelStoreError, discover, read_model_index
from ..models.storage import is_remote
from ..request.types import Limits

# The pipelines a DreamBooth LoRA is trained for: SD 1.x/2.x and SDXL base.
TRAINABLE = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
MIN_RESOLUTION = 64  # the server's smallest side (request.Limits.min_side)
SIZE_MULTIPLE = 8  # the VAE's down-sampling


class InputError(ValueError):
    """Input the training cannot use; the message names it and says what is allowed."""


@dataclass(frozen=True)
class TrainOptions:
    """The parsed flags (plain data: it travels to Ray workers)."""

    model_dir: str
    images: str
    instance_prompt: str
    name: str
    output: str
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_inference_steps: int = 25
    resolution: int | None = None  # None: the model's native size
    max_train_steps: int = 500
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # None: --learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    rank: int = 16
    alpha: float | None = None  # None: --rank (LoRA scale 1)
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = True
    use_8bit_adam: bool = False
    checkpointing_steps: int = 100
    checkpoints_total_limit: int = 3
    work_dir: str | None = None  # None: ./sdserve-train/<name>
    resume: bool = False
    validation_prompt: str | None = None  # None: --instance_prompt
    validation_steps: int = 50
    validation_inference_steps: int = 25
    seed: int = 0
    description: str | None = None
    scale: float = 1.0
    recipe_steps: int = 30
    ray_workers: int = 0
    ray_address: str | None = None
    ray_use_gpu: bool = False

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path("sdserve-train") / self.name

    @property
    def prior_preservation(self) -> bool:
        return self.class_prompt is not None

    def to_dict(self) -> dict:
        return asdict(self)


def _at_least(minimum: float, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    return parse


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one the help does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, True) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdserve train", formatter_class=_Help,
        description="Fine-tune a DreamBooth LoRA adapter for an SD 1.x/2.x or SDXL model and write it where "
        "sdserve servers read adapters (<output>/<name>/pytorch_lora_weights.safetensors + sdserve.json).",
    )
    need = p.add_argument_group("what to train")
    need.add_argument("--model_dir", required=True, help="diffusers model folder (base/ of a base+refiner folder "
                      "is used), or a remote location (s3://, gs://, hf://, https://) downloaded first")
    need.add_argument("--images", required=True, help="folder of instance images (PNG, JPEG, WebP, BMP); a .txt "
                      "beside an image (same stem) is its caption instead of --instance_prompt")
    need.add_argument("--instance_prompt", required=True, help='e.g. "a photo of sks dog"')
    need.add_argument("--name", required=True, help="adapter name: letters, digits, '.', '_', '-' (up to 64)")
    need.add_argument("--output", required=True, help="adapters folder (local, or s3://bucket/prefix): the "
                      "adapter goes to <output>/<name>/")
    prior = p.add_argument_group("prior preservation")
    prior.add_argument("--class_prompt", help='e.g. "a photo of a dog"; turns prior preservation on')
    prior.add_argument("--num_class_images", type=_at_least(1), default=100,
                       help="class images generated (once, kept in the work folder)")
    prior.add_argument("--prior_loss_weight", type=_at_least(0.0, float), default=1.0,
                       help="weight of the class images' loss")
    prior.add_argument("--class_inference_steps", type=_at_least(1), default=25,
                       help="denoising steps of each generated class image")
    train = p.add_argument_group("training")
    train.add_argument("--resolution", type=int, help="square training size in pixels (default: the model's "
                       "native size: 1024 for SDXL, 512 or 768 for SD)")
    train.add_argument("--max_train_steps", type=_at_least(1), default=500, help="optimisation steps")
    train.add_argument("--train_batch_size", type=_at_least(1), default=1, help="images per step and process")
    train.add_argument("--gradient_accumulation_steps", type=_at_least(1), default=1,
                       help="micro-batches per optimisation step")
    train.add_argument("--learning_rate", type=_at_least(0.0, float), default=1e-4, help="of the UNet's LoRA")
    train.add_argument("--text_encoder_lr", type=_at_least(0.0, float), help="default: --learning_rate")
    train.add_argument("--lr_scheduler", default="constant",
                       choices=["constant", "constant_with_warmup", "linear", "cosine"], help="learning rate schedule")
    train.add_argument("--lr_warmup_steps", type=_at_least(0), default=0, help="steps of the warm-up")
    train.add_argument("--adam_weight_decay", type=_at_least(0.0, float), default=1e-4, help="AdamW weight decay")
    train.add_argument("--max_grad_norm", type=_at_least(0.0, float), default=1.0,
                       help="gradient clipping (0: none)")
    train.add_argument("--rank", type=_at_least(1), default=16, help="LoRA rank")
    train.add_argument("--alpha", type=_at_least(0.0, float), help="LoRA alpha (default: --rank, i.e. scale 1)")
    train.add_argument("--lora_dropout", type=_at_least(0.0, float), default=0.0, help="dropout in the LoRA layers")
    train.add_argument("--train_text_encoder", action="store_true",
                       help="LoRA on the text encoder(s) too (their embeddings are then not cached)")
    train.add_argument("--mixed_precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                       help="auto: accelerate's setting if launched with one, else bf16 on a GPU that has it, "
                       "fp16 on other GPUs, no on a CPU")
    train.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
                       help="faster, needs more memory")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA; "
                       'pip install "sdserve[train-8bit]")')
    train.add_argument("--seed", type=int, default=0, help="of the LoRA initialisation, the data order and noise, "
                       "class image i (seed + i) and the validation image")
    state = p.add_argument_group("work folder, checkpoints, validation")
    state.add_argument("--work_dir", help="checkpoints, caches, class and validation images "
                       "(default: ./sdserve-train/<name>)")
    state.add_argument("--checkpointing_steps", type=_at_least(0), default=100, help="0: no checkpoints")
    state.add_argument("--checkpoints_total_limit", type=_at_least(1), default=3, help="checkpoints kept")
    state.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --work_dir")
    state.add_argument("--validation_prompt", help="default: --instance_prompt")
    state.add_argument("--validation_steps", type=_at_least(0), default=50, help="0: no validation images")
    state.add_argument("--validation_inference_steps", type=_at_least(1), default=25,
                       help="denoising steps of each validation image")
    recipe = p.add_argument_group("the adapter's recipe (sdserve.json)")
    recipe.add_argument("--description", help="default: what was trained, on what, how long")
    recipe.add_argument("--scale", type=float, default=1.0, help="recommended LoRA scale (-2 to 2)")
    recipe.add_argument("--recipe_steps", type=_at_least(1), default=30, help="recommended num_inference_steps")
    ray = p.add_argument_group("distributed with Ray Train")
    ray.add_argument("--ray_workers", type=_at_least(0), default=0, help="training processes under Ray Train's "
                     "TorchTrainer (0: no Ray)")
    ray.add_argument("--ray_address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    ray.add_argument("--ray_use_gpu", action="store_true", help="one GPU per Ray worker")
    return p


def parse_args(argv: list[str]) -> tuple[TrainOptions, argparse.ArgumentParser]:
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    names = {f.name for f in fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in values.items() if k in names}), parser


# -- checks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What training needs to know about a model before loading it."""

    base: Path  # the diffusers folder (or single-file checkpoint) of the base model
    pipeline_class: str
    family: str  # "sd" or "sdxl"
    native_size: int


def _config(folder: Path, component: str) -> dict:
    path = folder / component / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--model_dir: cannot read {path}: {exc}") from None


def inspect_model(model_dir: str) -> ModelInfo:
    """The base model under ``model_dir`` (a local folder), from its configuration files only."""
    try:
        layout = discover(model_dir)
        index = read_model_index(layout.index_folder)
    except ModelStoreError as exc:
        raise InputError(f"--model_dir: {exc}") from None
    class_name = index["_class_name"]
    if class_name not in TRAINABLE:
        raise InputError(
            f"--model_dir {model_dir}: a {class_name} model; sdserve train fine-tunes SD 1.x/2.x "
            f"(StableDiffusionPipeline) and SDXL base (StableDiffusionXLPipeline) diffusers models"
        )
    unet, vae = _config(layout.index_folder, "unet"), _config(layout.index_folder, "vae")
    if unet.get("in_channels") != vae.get("latent_channels", 4):
        raise InputError(f"--model_dir {model_dir}: an inpainting UNet ({unet.get('in_channels')} input channels); "
                         "train a LoRA on the text-to-image model instead")
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    size = unet.get("sample_size", 64)
    native = (size[0] if isinstance(size, list) else size) * scale
    return ModelInfo(layout.base, class_name, TRAINABLE[class_name], native)


def check_resolution(resolution: int | None, native: int) -> int:
    """The training size: given, or the model's native one; at most twice that."""
    if resolution is None:
        return native
    largest = 2 * native
    if resolution % SIZE_MULTIPLE or not MIN_RESOLUTION <= resolution <= largest:
        raise InputError(f"--resolution {resolution}: must be a multiple of {SIZE_MULTIPLE} from {MIN_RESOLUTION} "
                         f"to {largest} for this model (its native size is {native})")
    return resolution


def check_name(name: str) -> None:
    if not NAME.match(name):
        raise InputError(f"--name {name!r}: an adapter name is 1-64 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit (it becomes the folder <output>/<name> and the name requests use)")


def check_output(output: str) -> None:
    if output.startswith("s3://"):
        from ..models.storage import split_s3_uri

        try:
            split_s3_uri(output)
        except ValueError as exc:
            raise InputError(f"--output: {exc}") from None
        if importlib.util.find_spec("boto3") is None:
            raise InputError("--output s3://...: needs the storage support: pip install 'sdserve[storage]'")
    elif is_remote(output):
        raise InputError(f"--output {output}: give a local folder or an s3://bucket/prefix location")
    elif Path(output).exists() and not Path(output).is_dir():
        raise InputError(f"--output {output}: exists and is not a folder")


def check_flags(opts: TrainOptions) -> None:
    """The flags' values together, and the optional packages and hardware they ask for."""
    if opts.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam needs bitsandbytes (CUDA): pip install 'sdserve[train-8bit]'")
    if opts.ray_workers and importlib.util.find_spec("ray") is None:
        raise InputError("--ray_workers needs Ray Train: pip install 'sdserve[train]'")
    if opts.mixed_precision == "fp16" and not opts.ray_use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise InputError("--mixed_precision fp16 needs a GPU; use bf16 or no on a CPU")
    if opts.prior_preservation and not opts.class_prompt.strip():
        raise InputError("--class_prompt: empty; give the class, e.g. 'a photo of a dog'")
    if not opts.instance_prompt.strip():
        raise InputError("--instance_prompt: empty; give the prompt with the identifier, e.g. 'a photo of sks dog'")
    if not -2.0 <= opts.scale <= 2.0:
        raise InputError(f"--scale {opts.scale}: must be from -2 to 2")
    most = Limits().max_steps  # the engine makes class and validation images as a server would
    for flag in ("class_inference_steps", "validation_inference_steps", "recipe_steps"):
        if getattr(opts, flag) > most:
            raise InputError(f"--{flag} {getattr(opts, flag)}: must be from 1 to {most}")
