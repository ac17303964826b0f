"""Command-line flags of the server: KServe's own (``parents=[model_server.parser]``) plus sdserve's,
with underscores like KServe's. Nothing here runs at import time."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from ..adapters.library import parse_fuse_lora
from ..generation import EngineSettings
from ..models.loading import LoadOptions
from ..models.optimize import COMPILE_MODES, COMPILE_TARGETS, Optimizations, parse_sizes
from ..request.step_savings import SavingsDefaults, parse_interval
from ..request.types import Limits
from .model_setup import ModelSettings
from .request_policy import Policy

# Several 1024x1024 images (PNG ~1.5 MB, raw tensor 3 MB each) exceed gRPC's 8 MiB default.
GRPC_MESSAGE_BYTES = 256 * 1024 * 1024
# A 2048x2048 RGB PNG that does not compress is 12.6 MB, 16.8 MB in base64; with its mask, under 32 MiB.
MAX_BODY_BYTES = 32 * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    from kserve import model_server

    parser = argparse.ArgumentParser(
        prog="sdserve",
        parents=[model_server.parser],
        description="Serve a Stable Diffusion model (SDXL base + refiner, SD 1.x/2.x) over KServe v1, "
        "v2 REST and v2 gRPC. Other commands: 'sdserve tiny-model DIR' writes a tiny test model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(
        model_name="sdxl",
        grpc_max_send_message_length=GRPC_MESSAGE_BYTES,
        grpc_max_receive_message_length=GRPC_MESSAGE_BYTES,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_dir", default="/mnt/models",
                       help="diffusers folder, or a folder with base/ (+ refiner/); or a remote location "
                       "(s3://bucket/prefix, gs://, hf://, https://) downloaded at start-up")
    model.add_argument("--refiner_dir", default=None, help="SDXL refiner folder (or remote location), "
                       "when not <model_dir>/refiner")
    model.add_argument("--config_dir", default=None,
                       help="for a single-file checkpoint: a diffusers folder with model_index.json, component "
                       "configs and tokenizers (default: <model_dir>/config)")
    model.add_argument("--lora_dir", default=None,
                       help="LoRA adapters, one sub-folder per name: a folder (all loaded at start-up; default "
                       "<model_dir>/loras) or a remote store (s3://bucket/prefix/, gs://, hf://, ...) listed at "
                       "start-up, each adapter downloaded on first use")
    model.add_argument("--lora_relist_seconds", type=float, default=10.0, metavar="S",
                       help="a request naming an adapter not yet listed lists the store again, at most once every "
                       "S seconds (new adapters are served without a restart)")
    model.add_argument("--control_dir", default=None,
                       help="ControlNets, T2I-Adapters and IP-Adapters for SD 1.x/2.x and SDXL models, one folder per "
                       "name (default: <model_dir>/controls), or a remote location (downloaded at each listing); a "
                       "request naming one not yet listed lists again (at most every --lora_relist_seconds)")
    model.add_argument("--max_loaded_controls", type=int, default=8, metavar="N",
                       help="most control models loaded at once; loading another unloads the least recently used "
                       "(an SDXL ControlNet takes 2.5 GB in float16)")
    model.add_argument("--max_loaded_adapters", type=int, default=16, metavar="N",
                       help="most LoRA adapters loaded into the model at once; loading another unloads the least "
                       "recently used one that no image in flight uses (a local folder's first N load at start-up)")
    model.add_argument("--embeddings_dir", default=None, metavar="DIR",
                       help="textual-inversion embeddings (<name>.safetensors each; or a remote location, downloaded "
                       "at start-up) that weighted prompts name as <name> (default: <model_dir>/embeddings)")
    model.add_argument("--prompt_syntax", default="plain", choices=["plain", "compel", "a1111"],
                       help="how prompts of requests that give no prompt_syntax are read: plain (as diffusers reads "
                       "them: 77 tokens), compel or a1111 (weights, long prompts in 75-token chunks, BREAK, embeddings)")
    model.add_argument("--fuse_lora", default=None, metavar="NAME[:SCALE]",
                       help="fuse this LoRA adapter into the base weights at start-up (SCALE default: its "
                       "recipe's scale, else 1): no per-step LoRA cost, requests cannot name it, and its "
                       "sdserve.json recipe becomes the default of every request")
    model.add_argument("--preview_vae", default=None, metavar="DIR",
                       help="diffusers AutoencoderTiny folder (or remote location): the TAESD of the model's "
                       "family (taesd, taesdxl, taesd3), used for the partial images of streamed requests "
                       "instead of the built-in linear latent-to-RGB map; loaded at start-up")
    model.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                       help="small GPUs: keep weights in host memory and move whole models (model) or layers "
                       "(sequential) to the GPU when used")
    model.add_argument("--vae_tiling", action="store_true", help="decode images in tiles (less GPU memory for large sizes)")
    model.add_argument("--vae_slicing", action="store_true", help="decode a batch one image at a time")
    model.add_argument("--drop_t5", action="store_true",
                       help="SD3: do not load the T5-XXL text encoder (saves ~9 GB; prompts use the CLIP encoders only)")
    savings = parser.add_argument_group("fewer denoiser FLOPs per image (request defaults; each off by default)")
    savings.add_argument("--guidance_interval", default="0,1", metavar="LO,HI",
                         help="classifier-free guidance only between these fractions of each image's schedule (one "
                         "denoiser row instead of two outside it); 0,1: every step")
    savings.add_argument("--cache", default="none", choices=["none", "deep", "first_block"],
                         help="reuse deep features between steps: deep (UNet models: DeepCache), first_block (SD3: "
                         "First Block Cache); requests may ask for it themselves")
    savings.add_argument("--cache_interval", type=int, default=3, help="cache deep: the deep blocks run every N steps")
    savings.add_argument("--cache_threshold", type=float, default=0.1,
                         help="cache first_block: the relative change of the first block's output under which the "
                         "other blocks are skipped")
    speed = parser.add_argument_group("speed (each off by default: the plain diffusers path)")
    speed.add_argument("--fuse_qkv", action="store_true", help="fuse attention's Q, K and V projections")
    speed.add_argument("--channels_last", action="store_true", help="NHWC memory layout for UNet and VAE")
    speed.add_argument("--compile", default="none", choices=list(COMPILE_TARGETS),
                       help="torch.compile the denoiser, or the denoiser and the VAE decoder (all)")
    speed.add_argument("--compile_mode", default="default", choices=list(COMPILE_MODES),
                       help="inductor mode; reduce-overhead adds CUDA graphs")
    speed.add_argument("--warmup", default="", metavar="WxH,...",
                       help="sizes generated once at start-up (compiles them before the server is ready)")
    speed.add_argument("--compile_cache_dir", default=None,
                       help="inductor/Triton kernel cache (default: $TORCHINDUCTOR_CACHE_DIR); keep it on a volume")
    model.add_argument("--download_dir", default=None,
                       help="where remote model locations are downloaded (default: $XDG_CACHE_HOME/sdserve/models)")
    model.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    model.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                       help="weights and compute dtype; auto: float16 on CUDA, float32 on CPU")
    model.add_argument("--default_steps", type=int, default=None,
                       help="num_inference_steps when a request gives none (None: the pipeline's own, 50)")

    limits = parser.add_argument_group("request limits")
    defaults = Limits()
    limits.add_argument("--max_side", type=int, default=defaults.max_side, help="largest width or height")
    limits.add_argument("--max_pixels", type=int, default=defaults.max_pixels, help="largest width x height")
    limits.add_argument("--max_input_pixels", type=int, default=defaults.max_input_pixels,
                        help="largest start image or mask a request may send, in pixels (read from the file header "
                        "before decoding)")
    limits.add_argument("--max_steps", type=int, default=defaults.max_steps, help="largest num_inference_steps")
    limits.add_argument("--max_images", type=int, default=defaults.max_images, help="most images in one request")
    limits.add_argument("--max_prompt_length", type=int, default=defaults.max_prompt_length,
                        help="longest prompt, in characters")
    limits.add_argument("--max_controls", type=int, default=defaults.max_controls,
                        help="most control inputs (ControlNet, T2I-Adapter, IP-Adapter) in one request")
    limits.add_argument("--max_prompt_tokens", type=int, default=defaults.max_prompt_tokens,
                        help="most tokens a weighted prompt (prompt_syntax compel or a1111) is read as, per text encoder")

    batching = parser.add_argument_group("step scheduling and queueing")
    engine = EngineSettings()
    batching.add_argument("--max_batch_images", type=int, default=engine.max_batch_images,
                          help="most images in one denoiser call (two rows each with guidance): the memory bound")
    batching.add_argument("--max_active_images", type=int, default=None,
                          help="most images admitted to the step loop at once (default: 4 x --max_batch_images); "
                          "more requests wait in the queue")
    batching.add_argument("--max_batch_wait_ms", type=float, default=engine.max_wait_ms,
                          help="how long an idle worker waits for more requests before its first step")
    batching.add_argument("--max_queue", type=int, default=engine.max_queue,
                          help="requests that may wait for admission; beyond this the server answers 503 with Retry-After")
    batching.add_argument("--retry_after", type=int, default=engine.retry_after_s,
                          help="seconds suggested in Retry-After when the queue is full")

    robustness = parser.add_argument_group("deadlines, shutdown, health, access")
    policy = Policy()
    robustness.add_argument("--request_timeout", type=float, default=policy.request_timeout_s,
                            help="seconds a request may take, queueing included (header x-request-timeout "
                            "overrides it per request); past it the answer is 504 and denoising stops")
    robustness.add_argument("--grace_period", type=float, default=30,
                            help="on SIGTERM: seconds to finish queued and running requests before exiting")
    robustness.add_argument("--stuck_after", type=float, default=policy.stuck_after_s,
                            help="one denoising step (or decode) running longer than this marks the server not ready "
                            "and not live, so Kubernetes restarts it")
    robustness.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES,
                            help="largest request body (413 above); the default fits a 2048x2048 PNG and its mask in base64")
    robustness.add_argument("--api_key", default=os.environ.get("SDSERVE_API_KEY"),
                            help="require 'Authorization: Bearer <key>' on generation requests "
                            "(default: $SDSERVE_API_KEY; health and metrics stay open)")
    return parser


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs, validated: KServe's own flags stay in ``args``."""

    args: argparse.Namespace
    model: ModelSettings
    limits: Limits
    engine: EngineSettings
    policy: Policy


def _from_args(cls, args: argparse.Namespace, **overrides):
    """A settings dataclass from the flags of the same names (plus ``overrides``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{n: getattr(args, n) for n in names if hasattr(args, n)}, **overrides})


def load_config(argv: list[str] | None = None) -> ServerConfig:
    """Parse and validate the server's flags; exits with a usage error naming the bad flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers != 1:
        parser.error("--workers must be 1: one process owns the GPU; scale with replicas instead")
    if args.max_loaded_controls < 1:
        parser.error(f"--max_loaded_controls must be at least 1, got {args.max_loaded_controls}")
    if args.max_loaded_adapters < 1:
        parser.error(f"--max_loaded_adapters must be at least 1, got {args.max_loaded_adapters}")
    if not 0 <= args.lora_relist_seconds <= 86400:
        parser.error("--lora_relist_seconds must be from 0 to 86400")
    for flag in ("request_timeout", "grace_period", "stuck_after", "max_body_bytes"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be greater than 0")
    if args.default_steps is not None and not 1 <= args.default_steps <= args.max_steps:
        parser.error(f"--default_steps must be from 1 to --max_steps ({args.max_steps})")
    try:
        return ServerConfig(
            args=args,
            model=_from_args(
                ModelSettings,
                args,
                load_options=_from_args(LoadOptions, args),
                fuse_lora=parse_fuse_lora(args.fuse_lora),
                optimizations=_from_args(Optimizations, args, warmup=parse_sizes(args.warmup)),
                savings=_from_args(SavingsDefaults, args, guidance_interval=parse_interval(args.guidance_interval)),
            ),
            limits=_from_args(Limits, args),
            engine=_from_args(EngineSettings, args, max_wait_ms=args.max_batch_wait_ms, retry_after_s=args.retry_after),
            policy=_from_args(
                Policy, args, request_timeout_s=args.request_timeout, stuck_after_s=args.stuck_after,
                api_key=args.api_key or None,
            ),
        )
    except ValueError as exc:
        parser.error(str(exc))
